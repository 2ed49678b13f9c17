"""The shared quantizer family (pyzeroq.quantizers): the LSQ learned-step mode (gradients equal
LSQ's closed form and the round-STE formulation, forward equals pyzeroq.ops.fake_quantize), the
fixed mode (same forward at the same scale), records, and the bits in the state dict."""

import math

import numpy as np
import pytest
import torch

from pyzeroq import ops
from pyzeroq.qspec import CodeFormat
from pyzeroq.quantizers import (
    BitWidthMismatchError,
    QuantAct,
    QuantConv2d,
    WeightQuant,
    lsq_fake_quantize,
    lsq_round_ste,
)


def lsq_grads_ref(x, s, z, qmax, g, up):
    """Closed-form LSQ gradients (Esser et al. 2020, Eq. 3 and 5, asymmetric grid) in float64."""
    v = x / s
    lo, hi = -z, qmax - z
    inside = (v >= lo) & (v <= hi)
    dx = up * inside
    r = np.clip(np.round(v), lo, hi)  # numpy rounds half to even too
    ds_elem = np.where(inside, r - v, np.where(v < lo, lo, hi))
    return dx, (up * ds_elem).sum() * g


def calibrated_act(x: torch.Tensor, bits: int = 8, learned: bool = False) -> QuantAct:
    q = QuantAct(bits)
    q.mode = "observe"
    q(x)
    q.freeze()
    return q.learn_step() if learned else q


def test_lsq_forward_equals_ops_fake_quantize():
    x = torch.randn(4, 3, 5, 5) * 3
    scale, zp = ops.asymmetric_params(x, 4)
    y = lsq_fake_quantize(x, torch.as_tensor(scale).float(), torch.as_tensor(zp).float(), 15, 1.0)
    assert torch.equal(y, ops.fake_quantize(x, scale, zp, 4))
    w = torch.randn(6, 3, 3, 3)
    scale, zp = ops.asymmetric_params(w.reshape(6, -1), 4, axis=0)
    y = lsq_fake_quantize(w, torch.as_tensor(scale).view(-1, 1, 1, 1), torch.as_tensor(zp).float().view(-1, 1, 1, 1),
                          15, 1.0)
    assert torch.equal(y, ops.fake_quantize(w, scale, zp, 4, axis=0))


def test_lsq_gradients_match_closed_form_and_round_ste():
    torch.manual_seed(0)
    qmax = 15
    x = (torch.randn(2, 50, dtype=torch.float64) * 2)
    x[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # clamped below / above
    s = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    z = torch.tensor(6.0, dtype=torch.float64)
    g = 1.0 / math.sqrt(x[0].numel() * qmax)
    up = torch.randn_like(x)
    xa = x.clone().requires_grad_(True)
    (lsq_fake_quantize(xa, s, z, qmax, g) * up).sum().backward()
    dx_ref, ds_ref = lsq_grads_ref(x.numpy(), 0.37, 6.0, qmax, g, up.numpy())
    np.testing.assert_allclose(xa.grad.numpy(), dx_ref)
    np.testing.assert_allclose(s.grad.item(), ds_ref, rtol=1e-10)
    # the round-STE trick gives the same gradients
    s2 = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    xb = x.clone().requires_grad_(True)
    (lsq_round_ste(xb, s2, z, qmax, g) * up).sum().backward()
    np.testing.assert_allclose(xb.grad.numpy(), dx_ref)
    np.testing.assert_allclose(s2.grad.item(), ds_ref, rtol=1e-9)


def test_lsq_per_channel_step_gradient():
    torch.manual_seed(1)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    s = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64).view(-1, 1, 1, 1).requires_grad_(True)
    z = torch.tensor([7.0, 8.0, 9.0], dtype=torch.float64).view(-1, 1, 1, 1)
    up = torch.randn_like(w)
    g = 0.05
    (lsq_fake_quantize(w, s, z, 15, g) * up).sum().backward()
    for c in range(3):
        _, ds = lsq_grads_ref(w[c].numpy(), s[c].item(), z[c].item(), 15, g, up[c].numpy())
        np.testing.assert_allclose(s.grad[c].item(), ds, rtol=1e-10)


def test_learned_weight_quantizer_gradient_is_lsq_closed_form():
    """WeightQuant in learned mode: d/d step per channel with LSQ's g = 1/sqrt(N * Qmax)."""
    torch.manual_seed(2)
    w = torch.randn(3, 2, 3, 3)
    q = WeightQuant(None, 3)
    q.calibrate(w, 4)
    q.learn_step()
    up = torch.randn_like(w)
    (q(w) * up).sum().backward()
    g = 1.0 / math.sqrt(w[0].numel() * 15)
    for c in range(3):
        _, ds = lsq_grads_ref(w[c].double().numpy(), float(q.scale.detach()[c]), float(q.zero_point[c]), 15, g,
                              up[c].double().numpy())
        np.testing.assert_allclose(q.scale.grad[c].item(), ds, rtol=1e-4, atol=1e-6)


def test_learned_and_fixed_modes_give_identical_forward():
    torch.manual_seed(3)
    x = torch.randn(4, 3, 6, 6) * 2 + 0.5
    fixed, learned = calibrated_act(x), calibrated_act(x, learned=True)
    assert isinstance(learned.scale, torch.nn.Parameter) and not isinstance(fixed.scale, torch.nn.Parameter)
    assert torch.equal(fixed.scale, learned.scale.detach())
    y = torch.randn(2, 3, 6, 6) * 3  # also values clamped at both ends
    assert torch.equal(fixed(y), learned(y).detach())
    assert torch.equal(learned(y).detach(), ops.fake_quantize(y, fixed.scale, fixed.zero_point, 8))
    w = torch.randn(5, 3, 3, 3)
    wf, wl = WeightQuant(None, 5), WeightQuant(None, 5)
    wf.calibrate(w, 4)
    wl.calibrate(w, 4)
    wl.learn_step()
    assert torch.equal(wf(w), wl(w).detach())
    assert torch.equal(wl(w).detach(), ops.fake_quantize(w, wf.scale, wf.zero_point, 4, axis=0))


def test_record_matches_in_both_modes():
    x = torch.rand(2, 3, 4, 4) * 5 - 1
    fixed, learned = calibrated_act(x), calibrated_act(x, learned=True)
    assert fixed.record() == learned.record()
    r = learned.record()
    scale, zp = ops.asymmetric_params(x.reshape(-1), 8)
    assert r.bits == 8 and r.axis is None and r.scale_value == float(scale) and r.zero_point_value == int(zp)
    assert torch.equal(torch.as_tensor(r.fake_quantize(x.numpy())), learned(x).detach())
    with torch.no_grad():
        learned.scale.mul_(-1.0)  # a learned step is used by magnitude
    assert learned.record() == fixed.record()
    w = torch.randn(4, 2, 3, 3)
    wq = WeightQuant(None, 4)
    wq.calibrate(w, 6)
    wq.learn_step()
    rw = wq.record()
    assert rw.axis == 0 and rw.bits == 6
    assert torch.equal(torch.as_tensor(rw.fake_quantize(w.numpy())), wq(w).detach())


def test_initialization_from_asymmetric_params():
    x = torch.rand(2, 3, 4, 4) * 5 - 1
    q = QuantAct(8)
    q.mode = "observe"
    q(x[:1])
    q(x[1:])  # the range over all observed batches
    q.freeze()
    q.learn_step()
    scale, zp = ops.asymmetric_params(x.reshape(-1), 8)
    assert q.scale.item() == float(scale) and q.zero_point.item() == int(zp)
    assert q.zero_point.dtype == torch.int64 and q.scale.shape == ()
    w = torch.randn(6, 3, 3, 3)
    wq = WeightQuant(None, 6)
    wq.calibrate(w, 4)
    scale, zp = ops.asymmetric_params(w.reshape(6, -1), 4, axis=0)
    assert torch.equal(wq.scale, torch.as_tensor(scale)) and torch.equal(wq.zero_point, torch.as_tensor(zp).long())


def test_extra_state_bit_width_mismatch_raises():
    conv = torch.nn.Conv2d(2, 3, 3)
    layers = []
    for bits in (4, 6):
        q = QuantConv2d.from_float(conv, act_quant=QuantAct(8))
        q.weight_quant.calibrate(conv.weight, bits)
        q.weight_quant.learn_step()
        q.act_quant.learn_step()
        layers.append(q)
    state = layers[0].state_dict()
    assert state["weight_quant._extra_state"] == {"bits": 4, "mode": "quantize", "learned": True,
                                                  "format": {"signed": False, "narrow_range": False,
                                                             "symmetric": False}}
    with pytest.raises(BitWidthMismatchError, match="4-bit"):
        layers[1].load_state_dict(state)
    fixed = QuantConv2d.from_float(conv, act_quant=QuantAct(8))
    fixed.weight_quant.calibrate(conv.weight, 4)
    with pytest.raises(ValueError, match="learned"):
        fixed.load_state_dict(state)


def test_extra_state_code_format_mismatch_raises():
    """A state dict of symmetric signed weights does not load into an asymmetric quantizer."""
    conv = torch.nn.Conv2d(2, 3, 3)
    sym = CodeFormat(signed=True, narrow_range=True, symmetric=True)
    a, b = QuantConv2d.from_float(conv, weight_format=sym), QuantConv2d.from_float(conv)
    for layer in (a, b):
        layer.weight_quant.calibrate(conv.weight, 8)
    assert a.weight_quant.record().signed and (a.weight_quant.zero_point == 0).all()
    with pytest.raises(BitWidthMismatchError, match="codes"):
        b.load_state_dict(a.state_dict())
