"""ZeroQ statistics loss (distill.sample_stats_loss, BNStatistics) against the plain formula of
Eq. 3 written with torch's own mean / var and autograd (the implementation before the
closed-form backward), and distillation's layout choice and determinism."""

import pytest
import torch
from torch import nn
from toy_models import trained_tiny

from pyzeroq import models
from pyzeroq.distill import STD_EPS, BNStatistics, distill_data, input_memory_format, input_statistics_loss, sample_stats_loss

SHAPES = [(4, 3, 5, 7), (2, 6, 9), (5, 4), (3, 2, 2, 3, 4)]


def reference_loss(x, target_mean, target_std):
    """sum_{n,c} (mu - m)^2 / N + (sigma - s)^2 / N, per-sample stats over the positions."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    mean = flat.mean(dim=2)
    std = torch.sqrt(flat.var(dim=2, unbiased=False) + STD_EPS)
    return ((mean - target_mean).pow(2).sum() + (std - target_std).pow(2).sum()) / x.shape[0]


def _case(shape, dtype, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * torch.rand(c, generator=g, dtype=torch.float64)
         .reshape((1, c) + (1,) * (len(shape) - 2)) + offset).to(dtype)
    return x, torch.randn(c, generator=g).to(dtype), (torch.rand(c, generator=g) + 0.1).to(dtype)


def _both(x, m, s):
    """(loss, grad) of ours and of the reference for the same input."""
    out = []
    for fn in (sample_stats_loss, reference_loss):
        xx = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        loss = fn(xx, m, s)
        loss.backward()
        out.append((loss.detach(), xx.grad))
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_loss_and_gradient_match_reference_float64(shape):
    (l1, g1), (l2, g2) = _both(*_case(shape, torch.float64))
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=0)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset", [0.0, 50.0])  # 50: |mean| ~ 100 std (cancellation-prone)
def test_loss_and_gradient_match_reference_float32(shape, offset):
    x, m, s = _case(shape, torch.float32, offset)
    (l1, g1), (l2, g2) = _both(x, m, s)
    ref = reference_loss(x.double(), m.double(), s.double())
    torch.testing.assert_close(l1.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=0)
    torch.testing.assert_close(g1, g2, rtol=2e-4, atol=1e-6 * g2.abs().max().item())


def test_channels_last_input_and_gradient_layout():
    x, m, s = _case((3, 4, 6, 5), torch.float32)
    xc = x.contiguous(memory_format=torch.channels_last)
    (l1, g1), (l2, g2) = _both(xc, m, s)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=0)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)
    assert g1.is_contiguous(memory_format=torch.channels_last)


def test_gradcheck_and_scalar_targets():
    x, _, _ = _case((2, 3, 4, 4), torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: sample_stats_loss(t, 0.5, 2.0), (x,))
    torch.testing.assert_close(input_statistics_loss(x.detach()),
                               reference_loss(x.detach(), torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype)))


def test_second_derivative_refused():
    x, m, s = _case((2, 3, 4), torch.float64)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(sample_stats_loss(x, m, s), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|not differentiable|does not require grad"):
        g.sum().backward()


def test_bn_statistics_losses_match_reference(one_thread):
    model = trained_tiny()
    x = torch.rand(4, 1, 16, 16)
    with BNStatistics(model) as stats, torch.no_grad():
        model(x)
        ours = stats.losses()
        ref = [reference_loss(inp, bn.running_mean, torch.sqrt(bn.running_var + STD_EPS))
               for (_, bn), inp in zip(stats.layers, stats._inputs)]
    assert len(ours) == 3
    torch.testing.assert_close(torch.stack(ours), torch.stack(ref), rtol=1e-5, atol=0)


def test_bn_statistics_follow_changed_running_statistics(one_thread):
    """The targets sqrt(running_var + eps) are kept across steps; a running variance written in
    place or replaced between two forwards is read again (same losses as a fresh BNStatistics)."""
    model = trained_tiny()
    x = torch.rand(4, 1, 16, 16)
    with BNStatistics(model) as stats, torch.no_grad():
        model(x)
        stats.losses()
        stats.layers[0][1].running_var.mul_(3.0)
        stats.layers[1][1].running_var = stats.layers[1][1].running_var + 0.5
        model(x)
        cached = stats.losses()
    with BNStatistics(model) as fresh, torch.no_grad():
        model(x)
        assert all(torch.equal(a, b) for a, b in zip(cached, fresh.losses()))


def test_bn_statistics_in_training_mode_read_the_updated_statistics(one_thread):
    """A BatchNorm in training mode updates its running variance in place without bumping the
    tensor's version: the targets are then not kept across forwards."""
    model = trained_tiny().train()
    x = torch.rand(4, 1, 16, 16)
    with BNStatistics(model) as stats, torch.no_grad():
        for _ in range(3):
            model(x)
            ours = stats.losses()
            ref = [sample_stats_loss(inp, bn.running_mean, torch.sqrt(bn.running_var + STD_EPS))
                   for (_, bn), inp in zip(stats.layers, stats._inputs)]
            assert all(torch.equal(a, b) for a, b in zip(ours, ref))


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (5, 4)])
def test_a_second_backward_gives_the_same_gradient(shape):
    """The backward reads the centered values the forward kept without changing them (retain_graph)."""
    x, m, s = _case(shape, torch.float32)
    x.requires_grad_(True)
    loss = sample_stats_loss(x, m, s)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2) and g1.shape == x.shape


def test_rejects_tensor_without_channels():
    with pytest.raises(ValueError, match="x must be"):
        sample_stats_loss(torch.zeros(5), 0.0, 1.0)


class _ViewHead(nn.Module):
    """Conv-BN then .view over the spatial dims: cannot run on channels_last tensors (a 1-channel
    input is both layouts at once, so it takes 3)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.fc(y.view(y.shape[0], -1))


class _AssertsContiguous(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        assert x.is_contiguous(), "NCHW only"
        return self.bn(self.conv(x))


def test_memory_format_choice_and_fallback(one_thread):
    assert input_memory_format(_AssertsContiguous().eval(), torch.zeros(2, 3, 4, 4)) == torch.contiguous_format
    assert input_memory_format(trained_tiny(), torch.zeros(2, 1, 16, 16)) == torch.channels_last
    head = _ViewHead().eval()
    assert input_memory_format(head, torch.zeros(2, 3, 6, 6)) == torch.contiguous_format
    with pytest.raises(RuntimeError, match="view"):
        head(torch.zeros(2, 3, 6, 6).contiguous(memory_format=torch.channels_last))
    assert input_memory_format(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), torch.zeros(2, 3)) \
        == torch.contiguous_format
    result = distill_data(head, (3, 6, 6), num_samples=2, iters=3, progress=False)
    assert result.data.shape == (2, 3, 6, 6) and torch.isfinite(result.data).all()


def test_same_seed_same_data_and_contiguous(one_thread):
    model = trained_tiny()
    a = distill_data(model, (1, 16, 16), num_samples=6, batch_size=4, iters=8, seed=3, progress=False)
    b = distill_data(model, (1, 16, 16), num_samples=6, batch_size=4, iters=8, seed=3, progress=False)
    assert torch.equal(a.data, b.data) and a.history == b.history and a.final_loss == b.final_loss
    assert a.data.is_contiguous() and a.initial_loss == a.history[0] and len(a.history) == 16
    assert a.final_loss < a.initial_loss


def test_augment_must_be_a_bool_and_zero_iterations_report_their_loss():
    from pyzeroq.distill_genie import distill_genie

    m = models.load_pretrained("resnet20")
    for fn in (distill_data, distill_genie):
        with pytest.raises(TypeError, match="augment must be a bool"):
            fn(m, (1, 28, 28), 4, 1, progress=False, augment="no")  # a truthy string jittered the images
    r = distill_data(m, (1, 28, 28), 4, 0, progress=False)
    assert r.history == () and r.initial_loss == r.final_loss > 0  # initial was 0.0


@pytest.mark.parametrize("lr", [0.0, -0.5, float("nan"), float("inf"), True, "0.5"])
def test_learning_rate_is_checked_before_any_work(lr):
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        distill_data(trained_tiny(), (1, 16, 16), num_samples=2, iters=0, lr=lr, progress=False)
