"""Other spellings of ReLU / ReLU6 / eval-mode dropout (rewrites.canonical_activations) quantize
like the canonical ops: same integer model, no float op; look-alikes that differ stay float ops."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyzeroq as zq
from pyzeroq.models.layers import Normalize

FAST = dict(weight_bits=8, act_bits=8, calibration="gaussian", num_samples=8, progress=False)
SHAPE = (3, 12, 12)
SPELLINGS = {
    "relu": lambda x, training: torch.relu(x),  # the canonical form
    "method_relu": lambda x, training: x.relu(),
    "clamp_min_kw": lambda x, training: x.clamp(min=0),
    "torch_clamp_min": lambda x, training: torch.clamp_min(x, 0.0),
    "relu6": lambda x, training: F.relu6(x),  # the canonical form
    "clamp_0_6": lambda x, training: torch.clamp(x, 0, 6),
    "clip_0_6": lambda x, training: x.clip(0.0, 6.0),
    "dropout_eval": lambda x, training: torch.relu(F.dropout(x, 0.2, training)),
}
CANONICAL = {"method_relu": "relu", "clamp_min_kw": "relu", "torch_clamp_min": "relu", "clamp_0_6": "relu6",
             "clip_0_6": "relu6", "dropout_eval": "relu"}


class Net(nn.Module):
    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.act = Normalize((0.5,) * 3, (0.25,) * 3), act
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)
        self.bn.running_mean.uniform_(-0.5, 0.5)

    def forward(self, x):
        y = self.act(self.bn(self.conv(self.norm(x))), self.training)
        return self.fc(y.mean(dim=(2, 3)))


def _integer_outputs(act):
    q = zq.quantize(Net(act).eval(), zq.QuantConfig(**FAST), input_shape=SHAPE)
    assert q.report.float_ops == []
    x = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(2)).numpy()
    return zq.to_integer(q)(x)


@pytest.mark.parametrize("name", sorted(CANONICAL))
def test_spelling_quantizes_as_the_canonical_op(name):
    assert np.array_equal(_integer_outputs(SPELLINGS[name]), _integer_outputs(SPELLINGS[CANONICAL[name]]))


@pytest.mark.parametrize("act", [lambda x, t: x.clamp(0, 5), lambda x, t: x.clamp(min=0.5)],
                         ids=["clamp_0_5", "clamp_min_half"])
def test_look_alikes_stay_float_ops(act):
    with pytest.raises(ValueError, match="no quantized or no integer-only form"):
        zq.quantize(Net(act).eval(), zq.QuantConfig(**FAST), input_shape=SHAPE)


def test_dropout_that_drops_in_eval_mode_is_named():
    """F.dropout's training defaults to True: it drops at random even in eval mode."""
    with pytest.raises(ValueError, match=r"model: dropout \(dropout\) drops at random even in eval mode"):
        zq.quantize(Net(lambda x, t: F.dropout(x, 0.2)).eval(), zq.QuantConfig(**FAST), input_shape=SHAPE)


def test_the_model_keeps_its_spelling():
    model = Net(SPELLINGS["method_relu"]).eval()
    zq.quantize(model, zq.QuantConfig(**FAST), input_shape=SHAPE)
    gm = torch.fx.symbolic_trace(model)
    assert any(n.op == "call_method" and n.target == "relu" for n in gm.graph.nodes)
