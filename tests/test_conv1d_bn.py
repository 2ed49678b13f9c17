"""Conv1d (audio) and BatchNorm1d folded into Conv1d / Linear (MLP), end to end: no float op,
integer codes equal to the fake-quant model's, onnxruntime equal to the integer model, save /
load; the surgery check refuses a BatchNorm1d whose channels are not the Linear's features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from graph_net import Normalize1d
from test_integer_convert import FAST
from test_ops_coverage import check_all
from torch import nn
from zoo import bn

import pyzeroq as zq
from pyzeroq.integer import steps as S
from pyzeroq.models import Normalize

CHANNELS, LENGTH, CLASSES, BATCH = 2, 64, 6, 24
FEATURES = 16


def _bn(n: int) -> nn.Module:
    return bn(n, dims=1)


class AudioNet(nn.Module):
    """1-D CNN on [N, C, L]: strided, dilated, depthwise and 'same'-padded Conv1d + BN1d, a
    global average pool over time, Linear + BN1d, Linear."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize1d((0.5, 0.4), (0.25, 0.3))
        self.features = nn.Sequential(
            nn.Conv1d(CHANNELS, 8, 5, stride=2, padding=2), _bn(8), nn.ReLU(),
            nn.Conv1d(8, 8, 3, padding=2, dilation=2, groups=8), _bn(8), nn.ReLU6(),
            nn.Conv1d(8, 16, 4, padding="same"), _bn(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc1, self.bn, self.fc2 = nn.Linear(16, FEATURES), _bn(FEATURES), nn.Linear(FEATURES, CLASSES)

    def forward(self, x):
        x = self.pool(self.features(self.normalize(x))).flatten(1)
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class MLP(nn.Module):
    def __init__(self, hidden_first: bool = True):
        super().__init__()
        self.normalize = Normalize()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, FEATURES), _bn(FEATURES), nn.ReLU(),
                                  nn.Linear(FEATURES, FEATURES), _bn(FEATURES), nn.ReLU(),
                                  nn.Linear(FEATURES, CLASSES))

    def forward(self, x):
        return self.body(self.normalize(x))


def signals(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, CHANNELS, LENGTH, generator=torch.Generator().manual_seed(seed))


def test_audio_conv1d_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = AudioNet().eval()
    q = zq.quantize(model, zq.QuantConfig(**FAST), input_shape=(CHANNELS, LENGTH))
    assert len(q.report.folded_bn) == 4 and len(q.report.layers) == 5
    im = check_all(q, tmp_path, {"conv", "global_avg_pool", "linear", "linear_out"}, x=signals(BATCH))
    convs = [s for s in im.steps if isinstance(s, S.ConvStep)]
    assert [s.spatial_dims for s in convs] == [1, 1, 1]
    assert convs[0].stride == (1, 2) and convs[1].dilation == (1, 2) and convs[1].groups == 8
    assert convs[2].padding == (0, 1, 0, 2)  # 'same' with an even kernel: one more on the right (as torch)
    with torch.no_grad():
        fq, fp = q(signals(BATCH)), model(signals(BATCH))
    assert (fq.argmax(1) == fp.argmax(1)).float().mean() >= 0.8  # W8A8 keeps the float model's decisions


def test_mlp_with_batchnorm1d(tmp_path):
    torch.manual_seed(0)
    q = zq.quantize(MLP().eval(), zq.QuantConfig(**FAST), input_shape=(1, 28, 28))
    assert len(q.report.folded_bn) == 2
    check_all(q, tmp_path, {"linear", "linear_out", "reshape"})


def test_batchnorm1d_over_other_channels_is_refused():
    """A BatchNorm1d on [N, F, L] after a Linear over L: the BN's channels are F, not the
    Linear's outputs; folding would silently change the model. With F == L the shapes even
    match, so the surgery check is what catches it."""

    class Wrong(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.head = nn.Linear(8, 8), _bn(8), nn.Linear(64, 3)

        def forward(self, x):  # x [N, 8, 8]
            return self.head(self.bn(self.fc(x)).flatten(1))

    torch.manual_seed(0)
    with pytest.raises(ValueError, match="changed its float output"):
        zq.quantize(Wrong().eval(), zq.QuantConfig(**FAST), input_shape=(8, 8))


def test_linear_on_sequences(tmp_path):
    """Linear layers applied to [N, L, F] (rows of a sequence) and the logits Linear on [N, L, K]
    too: the simulator, onnxruntime (Reshape to rows and back) and integer_exact agree."""
    torch.manual_seed(0)

    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.normalize = Normalize()
            self.mix, self.mix2 = nn.Linear(28, FEATURES), nn.Linear(FEATURES, 8)
            self.head = nn.Linear(8, CLASSES)

        def forward(self, x):
            x = self.normalize(x).view(x.size(0), 28, 28)  # 28 rows of 28 pixels
            x = torch.relu(self.mix2(torch.relu(self.mix(x))))
            return self.head(x)  # per-row logits [N, 28, CLASSES]

    q = zq.quantize(Rows().eval(), zq.QuantConfig(**FAST), input_shape=(1, 28, 28))
    im = zq.to_integer(q)
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    assert im(x).shape == (6, 28, CLASSES)
    check_all(q, tmp_path, {"linear", "linear_out"}, x=x)
    np.testing.assert_array_equal(zq.integer_exact(q)(x).detach().numpy(), im(x).numpy())


class PreActivation(nn.Module):
    """BatchNorm1d that follows no layer: on [N, F] (the flattened input, and after a ReLU) and on
    [N, C, L] (pre-activation BN-ReLU-Conv1d)."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize1d((0.5, 0.4), (0.25, 0.3))
        self.bn_seq, self.conv = _bn(CHANNELS), nn.Conv1d(CHANNELS, 8, 5, 4)
        self.bn_in, self.fc1 = _bn(8 * 15), nn.Linear(8 * 15, FEATURES)
        self.bn_mid, self.fc2 = _bn(FEATURES), nn.Linear(FEATURES, CLASSES)

    def forward(self, x):
        x = self.conv(torch.relu(self.bn_seq(self.normalize(x))))
        x = self.fc1(self.bn_in(x.flatten(1)))
        return self.fc2(self.bn_mid(torch.relu(x)))


def test_batchnorm1d_after_no_layer(tmp_path):
    torch.manual_seed(0)
    q = zq.quantize(PreActivation().eval(), zq.QuantConfig(**FAST), input_shape=(CHANNELS, LENGTH))
    assert q.report.float_ops == [] and len(q.report.layers) == 6
    assert any("bn_in" in n and "bn_mid" in n for n in q.report.notes)
    im = check_all(q, tmp_path, {"conv", "linear_out"}, x=signals(BATCH))
    assert sorted(s.spatial_dims for s in im.steps if isinstance(s, S.ConvStep)) == [0, 0, 0, 1]
    np.testing.assert_array_equal(zq.integer_exact(q)(signals(BATCH)).detach().numpy(), im(signals(BATCH)).numpy())
