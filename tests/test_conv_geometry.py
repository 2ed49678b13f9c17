"""Conv2d geometries end to end (fake-quant, integer, onnxruntime, integer_exact): depthwise
with a channel multiplier, grouped, dilated, strided, 'same' / 'valid' / asymmetric zero padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_integer_convert import images, quantize
from test_ops_coverage import WIDTH, check_all
from torch import nn

import pyzeroq as zq
from pyzeroq.models import Normalize

GEOMETRIES = {
    "depthwise_multiplier": dict(in_channels=WIDTH, out_channels=2 * WIDTH, kernel_size=3, padding=1, groups=WIDTH),
    "grouped_strided": dict(in_channels=WIDTH, out_channels=WIDTH, kernel_size=3, stride=2, padding=1, groups=2),
    "dilated_same": dict(in_channels=WIDTH, out_channels=WIDTH, kernel_size=3, padding="same", dilation=2),
    "valid_rect": dict(in_channels=WIDTH, out_channels=WIDTH, kernel_size=(1, 5), padding="valid"),
    "even_same": dict(in_channels=WIDTH, out_channels=WIDTH, kernel_size=4, padding="same"),
}


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_conv_geometry(geometry, tmp_path):
    torch.manual_seed(0)
    spec = GEOMETRIES[geometry]
    out = spec["out_channels"]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize, self.stem = Normalize(), nn.Conv2d(1, WIDTH, 3, 2, 1)
            self.conv, self.fc = nn.Conv2d(**spec), nn.Linear(out, 10)

        def forward(self, x):
            x = torch.relu(self.conv(torch.relu(self.stem(self.normalize(x)))))
            return self.fc(x.mean((2, 3)))

    q = quantize(Net())
    im = check_all(q, tmp_path, {"conv"})
    x = images(8)
    np.testing.assert_array_equal(zq.integer_exact(q)(x).detach().numpy(), im(x).numpy())
