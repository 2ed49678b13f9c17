"""ConvTranspose2d (groups 1) held as the equivalent convolution: the fake-quant forward equals
torch's conv_transpose2d, the integer model runs the convolution on the input with zero-point
codes inserted between pixels, onnxruntime equals the integer model bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_integer_convert import images, quantize
from test_ops_coverage import WIDTH, _conv, check_all
from torch import nn

from pyzeroq.integer import steps as S
from pyzeroq.models import Normalize
from pyzeroq.quantizers import QuantConvTranspose2d

GEOMETRIES = [dict(kernel_size=4, stride=2, padding=1), dict(kernel_size=3, stride=2, padding=1, output_padding=1),
              dict(kernel_size=2, stride=2), dict(kernel_size=3, stride=2, padding=2, dilation=2),
              dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=(3, 5), stride=(2, 3), padding=(1, 2))]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
def test_float_forward_is_conv_transpose(geometry):
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(3, 5, **geometry)
    q = QuantConvTranspose2d.from_float(conv)
    x = torch.randn(2, 3, 6, 7)
    with torch.no_grad():
        torch.testing.assert_close(q(x), conv(x), rtol=0, atol=1e-6)


def test_zero_insertion():
    x = np.arange(6, dtype=np.uint8).reshape(1, 1, 2, 3) + 1
    got = S.insert_zero_points(x, (2, 3), 9)
    want = np.full((1, 1, 3, 7), 9, np.uint8)
    want[0, 0, ::2, ::3] = x[0, 0]
    np.testing.assert_array_equal(got, want)


class Decoder(nn.Module):
    """Encoder convs, then transposed convs of several geometries (BN folded into the first)."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize()
        self.down = nn.Sequential(_conv(1, WIDTH, 2), nn.ReLU(), _conv(WIDTH, WIDTH, 2), nn.ReLU())
        self.up1 = nn.ConvTranspose2d(WIDTH, WIDTH, 4, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(WIDTH)
        self.up2 = nn.ConvTranspose2d(WIDTH, WIDTH, 3, 2, 1, output_padding=1)
        self.mix = nn.ConvTranspose2d(WIDTH, WIDTH, 3, 1, 2, dilation=2)
        self.fc = nn.Linear(WIDTH, 10)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.3, 0.3)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.down(self.normalize(x))
        x = F.relu(self.bn(self.up1(x)))
        x = torch.relu(self.mix(F.relu(self.up2(x))))
        return self.fc(x.mean((2, 3)))


def test_decoder_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = Decoder().eval()
    q = quantize(model)
    assert q.report.folded_bn["bn"] == "up1"
    im = check_all(q, tmp_path, {"conv"})
    ups = [s for s in im.steps if isinstance(s, S.ConvStep) and s.upsample != (1, 1)]
    assert [s.upsample for s in ups] == [(2, 2), (2, 2)]
    assert ups[0].padding == (2, 2, 2, 2) and ups[1].padding == (1, 1, 2, 2)  # d(k-1)-p, + output_padding
    assert im.run(images(2))[ups[1].output].shape == (2, WIDTH, 28, 28)


def test_unsupported_transposed_convs_are_listed():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.up = nn.Conv2d(1, 4, 3), nn.ConvTranspose2d(4, 4, 2, 2, groups=2)

        def forward(self, x):
            return self.up(self.c(x))

    with pytest.raises(ValueError, match="ConvTranspose2d"):
        quantize(Grouped())
