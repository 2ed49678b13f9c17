"""LSQ fake quantization: forward equals pyzeroq.ops.fake_quantize, gradients equal LSQ's
closed form (numpy reference) and the round-STE formulation."""

import math

import numpy as np
import torch

from pyzeroq import ops
from pyzeroq.detection.lsq import LSQQuantizer, lsq_fake_quantize, lsq_round_ste


def lsq_grads_ref(x, s, z, qmax, g, up):
    """Closed-form LSQ gradients (Esser et al. 2020, Eq. 3 and 5, asymmetric grid) in float64."""
    v = x / s
    lo, hi = -z, qmax - z
    inside = (v >= lo) & (v <= hi)
    dx = up * inside
    r = np.clip(np.round(v), lo, hi)  # numpy rounds half to even too
    ds_elem = np.where(inside, r - v, np.where(v < lo, lo, hi))
    return dx, (up * ds_elem).sum() * g


def test_forward_equals_ops_fake_quantize():
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


def test_per_channel_step_gradient():
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


def test_quantizer_initializes_from_asymmetric_params():
    q = LSQQuantizer(8)
    x = torch.rand(2, 3, 4, 4) * 5 - 1
    q(x)
    scale, zp = ops.asymmetric_params(x.reshape(-1), 8)
    assert q.scale.item() == float(scale) and q.zero_point.item() == float(zp)
    q2 = LSQQuantizer(8)
    q2.observe(x[:1])
    q2.observe(x[1:])
    q2.finalize()
    assert q2.scale.item() == float(scale)
