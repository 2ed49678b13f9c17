"""eval_batchnorm_grad: BatchNorm's input gradient in eval mode as g * invstd * weight, bit for bit
torch's own (native_batch_norm_backward), only on the layers it may touch, and undone on exit."""

import pytest
import torch
from torch import nn
from toy_models import trained_tiny

from pyzeroq.distill import distill_data
from pyzeroq.eval_bn import eval_batchnorm_grad


def _frozen_bn(cls, channels: int, affine: bool = True, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    bn = cls(channels, affine=affine).eval()
    bn.running_mean.copy_(torch.randn(channels, generator=g))
    bn.running_var.copy_(torch.rand(channels, generator=g) * 3 + 1e-3)
    bn.running_var[0] = 0.0  # invstd = 1 / sqrt(eps): the smallest variance a layer can hold
    if affine:
        bn.weight.data.copy_(torch.randn(channels, generator=g))
        bn.bias.data.copy_(torch.randn(channels, generator=g))
        bn.weight.data[1 % channels] = 0.0  # a dead channel: zero gradient
    for p in bn.parameters():
        p.requires_grad_(False)
    return bn


def _grad(bn, x, g, switched: bool):
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    if switched:
        with eval_batchnorm_grad(bn) as n:
            assert n == 1
            y = bn(x)
    else:
        y = bn(x)
    (dx,) = torch.autograd.grad(y, x, g)
    return y.detach(), dx


CASES = [(nn.BatchNorm1d, (6, 5)), (nn.BatchNorm1d, (4, 5, 7)), (nn.BatchNorm2d, (8, 16, 9, 7)),
         (nn.BatchNorm2d, (3, 3, 5, 5)), (nn.BatchNorm3d, (2, 4, 3, 5, 6))]


@pytest.mark.parametrize("cls,shape", CASES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_input_gradient_are_torchs_bit_for_bit(cls, shape, affine, channels_last, dtype):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is a 4-D layout")
    bn = _frozen_bn(cls, shape[1], affine).to(dtype)
    g = torch.Generator().manual_seed(1)
    x, grad = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    if channels_last:
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    y_ref, dx_ref = _grad(bn, x, grad, switched=False)
    y, dx = _grad(bn, x, grad, switched=True)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    assert dx.stride() == dx_ref.stride()


def test_only_frozen_plain_eval_batchnorms_with_running_stats_are_switched():
    class MyBN(nn.BatchNorm2d):
        pass

    trainable = nn.BatchNorm2d(3).eval()
    model = nn.Sequential(_frozen_bn(nn.BatchNorm2d, 3), nn.BatchNorm2d(3).train(), trainable,
                          _frozen_bn(MyBN, 3), nn.BatchNorm2d(3, track_running_stats=False).eval())
    for p in model[1].parameters():
        p.requires_grad_(False)
    with eval_batchnorm_grad(model) as n:
        assert n == 1
        assert "forward" in vars(model[0]) and all("forward" not in vars(m) for m in model[1:])


def test_hooks_run_and_the_model_is_restored_also_on_an_exception():
    bn = _frozen_bn(nn.BatchNorm2d, 4)
    seen = []
    handle = bn.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    with pytest.raises(RuntimeError, match="boom"):
        with eval_batchnorm_grad(bn):
            bn(torch.randn(2, 4, 3, 3))
            raise RuntimeError("boom")
    handle.remove()
    assert seen == [torch.Size([2, 4, 3, 3])]
    assert "forward" not in vars(bn)
    y = bn(torch.randn(2, 4, 3, 3, requires_grad=True))
    assert type(y.grad_fn).__name__ == "NativeBatchNormBackward0"


def test_distilled_images_do_not_change(one_thread, monkeypatch):
    """Distillation runs with it (distill_session): the same images and losses as with torch's
    own BatchNorm backward."""
    model = trained_tiny()
    fast = distill_data(model, (1, 16, 16), num_samples=4, iters=8, seed=3, progress=False)
    monkeypatch.setattr("pyzeroq.distill.eval_batchnorm_grad", lambda m: __import__("contextlib").nullcontext(0))
    plain = distill_data(model, (1, 16, 16), num_samples=4, iters=8, seed=3, progress=False)
    assert torch.equal(fast.data, plain.data)
    assert fast.history == plain.history


@pytest.mark.parametrize("change", ["in place", "replaced", "weight", "eps"])
def test_statistics_changed_inside_the_block_are_read_again(change):
    """invstd and weight are cached across steps (distillation reads the same statistics hundreds of
    times); a change of the statistics, the weight or eps inside the block is not missed."""
    bn = _frozen_bn(nn.BatchNorm2d, 5)
    g = torch.Generator().manual_seed(2)
    x, grad = torch.randn(3, 5, 4, 4, generator=g), torch.randn(3, 5, 4, 4, generator=g)
    with eval_batchnorm_grad(bn):
        x1 = x.clone().requires_grad_(True)
        torch.autograd.grad(bn(x1), x1, grad)  # fills the cache
        if change == "in place":
            bn.running_var.mul_(4.0)
        elif change == "replaced":
            bn.running_var = bn.running_var * 4.0
        elif change == "weight":
            bn.weight.data.mul_(-2.0)
        else:
            bn.eps = 0.5
        x2 = x.clone().requires_grad_(True)
        (dx,) = torch.autograd.grad(bn(x2), x2, grad)
    _, dx_ref = _grad(bn, x, grad, switched=False)
    assert torch.equal(dx, dx_ref)
