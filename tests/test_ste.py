"""fake_quantize_ste: forward equals the kernel, backward is the straight-through estimator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyzeroq import ops


def test_forward_equals_kernel_and_grad_is_ste_per_tensor():
    scale, zp, bits = 0.5, 2, 3  # codes 0..7 -> clamp range [0.5*(0-2), 0.5*(7-2)] = [-1.0, 2.5]
    x = torch.tensor([-3.0, -1.2, -1.0, -0.99, -0.25, 0.0, 0.3, 1.25, 2.5, 2.51, 2.7, 10.0], requires_grad=True)
    y = ops.fake_quantize_ste(x, scale, zp, bits)
    assert y.requires_grad and y.dtype == torch.float32
    np.testing.assert_array_equal(y.detach().numpy(), ops.fake_quantize(x.detach().numpy(), scale, zp, bits))
    upstream = torch.arange(1.0, 13.0)
    y.backward(upstream)
    #                  -3  -1.2 -1.0 -.99 -.25  0   .3  1.25 2.5 2.51 2.7  10
    expected_mask = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    np.testing.assert_array_equal(x.grad.numpy(), upstream.numpy() * np.array(expected_mask, np.float32))


def test_grad_per_channel_axis1():
    scale = torch.tensor([0.1, 1.0])
    zp = torch.tensor([0, 255], dtype=torch.int32)
    bits = 8
    # channel 0: range [0, 25.5]; channel 1: range [-255, 0]
    x = torch.tensor([[[-0.1, 0.0, 25.5, 25.6]], [[-256.0, -255.0, 0.0, 0.01]]]).permute(1, 0, 2).contiguous()
    x.requires_grad_()
    y = ops.fake_quantize_ste(x, scale, zp, bits, axis=1)
    (y * 2).sum().backward()
    expected = np.array([[[0, 2, 2, 0], [0, 2, 2, 0]]], np.float32)
    np.testing.assert_array_equal(x.grad.numpy(), expected)


def _expected_mask(x, scale, zp, bits, axis):
    qmax = 2**bits - 1
    s = np.asarray(scale, np.float32).reshape(-1)
    z = np.asarray(zp, np.int64).reshape(-1)
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = -1
    lo = (s * (0 - z).astype(np.float32)).astype(np.float32).reshape(shape)
    hi = (s * (qmax - z).astype(np.float32)).astype(np.float32).reshape(shape)
    return (x >= lo) & (x <= hi)


@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("bits", [2, 8, 12])
def test_grad_random_matches_hand_mask(axis, bits):
    rng = np.random.default_rng(bits)
    xn = (rng.standard_normal((16, 4, 9)) * 2).astype(np.float32)
    c = 1 if axis is None else xn.shape[axis]
    qmax = 2**bits - 1
    scale = rng.uniform(0.5, 2.0, c).astype(np.float32) / qmax
    zp = rng.integers(0, qmax + 1, c)
    if axis is None:
        scale, zp = scale[0], int(zp[0])
    x = torch.from_numpy(xn.copy()).requires_grad_()
    y = ops.fake_quantize_ste(x, torch.as_tensor(scale), torch.as_tensor(zp), bits, axis)
    g = torch.from_numpy(rng.standard_normal(xn.shape).astype(np.float32))
    y.backward(g)
    mask = _expected_mask(xn, scale, zp, bits, axis)
    assert 0 < mask.sum() < mask.size
    np.testing.assert_array_equal(x.grad.numpy(), np.where(mask, g.numpy(), np.float32(0)))
    np.testing.assert_array_equal(y.detach().numpy(), ops.fake_quantize(xn, scale, zp, bits, axis))
    # the pure-torch mask (used off CPU) agrees
    np.testing.assert_array_equal(ops._ste_mask_torch(x.detach(), scale, zp, bits, axis).numpy(), mask)


def test_grad_non_contiguous_upstream_and_float64():
    x = torch.linspace(-2, 2, 40).reshape(4, 10).requires_grad_()
    y = ops.fake_quantize_ste(x, 0.01, 100, 8)
    (y * torch.ones(10)).sum().backward()  # upstream grad is an expanded (stride-0) tensor
    mask = _expected_mask(x.detach().numpy(), 0.01, 100, 8, None)
    np.testing.assert_array_equal(x.grad.numpy(), mask.astype(np.float32))
    x64 = torch.linspace(-2, 2, 40, dtype=torch.float64).requires_grad_()
    y64 = ops.fake_quantize_ste(x64, 0.01, 100, 8)
    assert y64.dtype == torch.float64
    y64.sum().backward()
    assert x64.grad.dtype == torch.float64
    np.testing.assert_array_equal(x64.grad.numpy(), mask.reshape(-1).astype(np.float64))


def test_ste_in_a_module_graph():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 4, 3)
    x = torch.randn(8, 1, 28, 28)
    act = conv(x)
    s, z = ops.asymmetric_params(act.detach(), 8)
    out = ops.fake_quantize_ste(act, s, z, 8).relu().mean()
    out.backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


# ------------------------------------------------------------------ pure-torch fallback


@pytest.mark.parametrize("axis", [None, 0, 1, 3, -3])
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_torch_fallback_equals_kernel(axis, bits):
    rng = np.random.default_rng(bits + 7)
    xn = (rng.standard_normal((3, 5, 4, 6)) * 3).astype(np.float32)
    c = 1 if axis is None else xn.shape[axis]
    qmax = 2**bits - 1
    scale = rng.uniform(0.5, 8.0, c).astype(np.float32) / qmax
    zp = rng.integers(0, qmax + 1, c)
    if axis is None:
        scale, zp = scale[0], zp[0]
    # add constructed ties x / s == k + 0.5 along the first channel
    s0 = np.float32(np.asarray(scale).reshape(-1)[0])
    ks = np.arange(-8, 8) + 0.5
    xn.reshape(-1)[: ks.size] = (ks.astype(np.float32) * s0).astype(np.float32)
    want = ops.fake_quantize(xn, scale, zp, bits, axis)
    got = ops._fake_quantize_torch(torch.from_numpy(xn), scale, zp, bits, axis)
    np.testing.assert_array_equal(got.numpy(), want)
    got_t = ops._fake_quantize_torch(torch.from_numpy(xn), torch.as_tensor(scale), torch.as_tensor(zp), bits, axis)
    np.testing.assert_array_equal(got_t.numpy(), want)


def test_torch_fallback_clamp_edges():
    scale, zp, bits = np.float32(0.37), 3, 4
    x = np.array([-3e38, -1.11, -1.2, 0, 4.07, 4.1, 3e38, 5.0, -0.0], np.float32)
    np.testing.assert_array_equal(ops._fake_quantize_torch(torch.from_numpy(x), scale, zp, bits).numpy(),
                                  ops.fake_quantize(x, scale, zp, bits))


# Non-CPU tensors take the pure-torch formula; "meta" tensors (shapes only) stand in for CUDA here.
@pytest.mark.parametrize("fn", [ops.fake_quantize, ops.fake_quantize_ste], ids=["fake_quantize", "ste"])
@pytest.mark.parametrize("scale, zp, bits, axis, match", [
    (0.0, 0, 8, None, "scale"), (float("nan"), 0, 8, None, "scale"), (1.0, 999, 8, None, "zero_point"),
    (1.0, 0, 1, None, "bits"), (np.ones(3, np.float32), np.zeros(3, np.int32), 8, 5, "axis"),
    (np.ones(2, np.float32), np.zeros(2, np.int32), 8, 1, "scale has 2 values")])  # for 3 channels
def test_non_cpu_tensors_get_the_kernels_parameter_checks(fn, scale, zp, bits, axis, match):
    x = torch.zeros(2, 3, 4, device="meta")
    with pytest.raises(ValueError, match=match):
        fn(x, scale, zp, bits, axis)


def test_non_cpu_fake_quantize_returns_float32_like_the_kernel():
    for device in ("cpu", "meta"):
        y = ops.fake_quantize(torch.zeros(2, 3, dtype=torch.float16, device=device), np.ones(3, np.float32),
                              np.zeros(3, np.int32), 8, axis=1)
        assert (y.dtype, y.shape, y.device.type) == (torch.float32, (2, 3), device)
    assert ops.fake_quantize_ste(torch.zeros(3, dtype=torch.float16, device="meta"), 1.0, 0, 8).dtype == torch.float16
