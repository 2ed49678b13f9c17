"""conv_grad: the polyphase input gradient of a strided convolution against torch's own backward
(float64, every geometry a stem can have), and FastStemGrad's routing: only the calls it is meant
for, same forward values, and distillation with it equal to distillation without it."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pyzeroq.conv_grad import MAX_POLYPHASE_IN_CHANNELS, FastStemGrad, StepStemGrad, polyphase_input_grad
from pyzeroq.distill import BNStatistics, distill_data


def torch_input_grad(go, x, w, stride, padding):
    return torch.ops.aten.convolution_backward(go, x, w, None, list(stride), list(padding), [1, 1], False,
                                               [0, 0], 1, [True, False, False])[0]


def check_geometry(c_in, c_out, k, s, p, h, w, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, *k, generator=g, dtype=torch.float64)
    y = F.conv2d(x, weight, stride=s, padding=p)
    go = torch.randn(y.shape, generator=g, dtype=torch.float64)
    ref = torch_input_grad(go, x, weight, s, p)
    got = polyphase_input_grad(go, weight, (h, w), s, p)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,s,p", [((7, 7), (2, 2), (3, 3)), ((3, 3), (2, 2), (1, 1)), ((1, 1), (2, 2), (0, 0)),
                                   ((4, 4), (4, 4), (0, 0)), ((3, 3), (3, 3), (2, 2)), ((5, 3), (2, 1), (2, 0)),
                                   ((3, 3), (1, 1), (1, 1)), ((2, 2), (2, 2), (0, 0))])
@pytest.mark.parametrize("h,w", [(16, 16), (15, 17), (7, 9)])
def test_polyphase_grad_equals_torch_backward(k, s, p, h, w):
    check_geometry(3, 5, k, s, p, h, w)


def test_polyphase_grad_resnet_stem_at_224():
    check_geometry(3, 8, (7, 7), (2, 2), (3, 3), 224, 224, n=1)


@settings(max_examples=40, deadline=None)
@given(k=st.tuples(st.integers(1, 7), st.integers(1, 7)), s=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       extra=st.tuples(st.integers(0, 9), st.integers(0, 9)), c_in=st.integers(1, 4), seed=st.integers(0, 99))
def test_polyphase_grad_any_geometry(k, s, extra, c_in, seed):
    p = (min(k[0] - 1, seed % 4), min(k[1] - 1, seed % 3))  # padding below the kernel size
    check_geometry(c_in, 3, k, s, p, k[0] + extra[0], k[1] + extra[1], seed=seed)


class Stem(nn.Module):
    def __init__(self, c_in=3, stride=2, groups=1, dilation=1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, 6, 5, stride, 2, dilation=dilation, groups=groups)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, 2, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn(self.conv(x)))))


def grads(model, x, mode: bool):
    x = x.detach().clone().requires_grad_(True)
    with BNStatistics(model) as stats:
        if mode:
            with FastStemGrad():
                model(x)
        else:
            model(x)
        loss = stats.loss()
    loss.backward()
    return loss.detach(), x.grad


def calls(model, x):
    """How many conv2d calls FastStemGrad routed through its own autograd function."""
    x = x.detach().clone().requires_grad_(True)
    with FastStemGrad():
        y = model(x)
    nodes, stack = 0, [y.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None:
            continue
        nodes += type(fn).__name__ == "_StemConvBackward"
        stack.extend(f for f, _ in fn.next_functions)
    return nodes


def frozen(model):
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model


def test_fast_stem_grad_same_forward_and_gradient_and_routes_only_the_stem():
    torch.manual_seed(0)
    model = frozen(Stem())
    x = torch.randn(3, 3, 20, 20)
    loss_a, grad_a = grads(model, x, mode=False)
    loss_b, grad_b = grads(model, x, mode=True)
    assert torch.equal(loss_a, loss_b)  # the forward is conv2d's own
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-5, atol=1e-6)
    assert calls(model, x) == 1  # conv2 has 6 input channels: torch's backward


@pytest.mark.parametrize("make,why", [
    (lambda: Stem(stride=1), "stride 1"),
    (lambda: Stem(c_in=MAX_POLYPHASE_IN_CHANNELS + 1), "too many input channels"),
    (lambda: Stem(groups=3), "grouped"),
    (lambda: Stem(dilation=2), "dilated")])
def test_fast_stem_grad_leaves_other_convolutions_to_torch(make, why):
    torch.manual_seed(0)
    model = frozen(make())
    assert calls(model, torch.randn(2, model.conv.in_channels, 20, 20)) == 0, why


def test_fast_stem_grad_skips_trainable_weights_and_no_grad():
    torch.manual_seed(0)
    model = Stem().eval()  # weights need their gradient: torch's backward computes it
    assert calls(model, torch.randn(2, 3, 20, 20)) == 0
    frozen(model)
    with torch.no_grad(), FastStemGrad():
        y = model(torch.randn(2, 3, 20, 20))
    assert y.grad_fn is None


@pytest.mark.parametrize("stride,kept", [(2, True), (1, False)])
def test_step_stem_grad_drops_the_mode_after_a_first_step_that_routed_nothing(stride, kept):
    model = frozen(Stem(stride=stride))
    stem_grad, modes = StepStemGrad(), []
    for _ in range(3):
        mode = stem_grad.step()
        with mode:
            model(torch.randn(2, 3, 12, 12, requires_grad=True))
        modes.append(mode)
    assert isinstance(modes[0], FastStemGrad)
    assert all(isinstance(m, FastStemGrad) == kept for m in modes[1:])
    assert modes[0].routed == (1 if kept else 0)


def test_distillation_with_the_polyphase_stem_matches_plain_torch(monkeypatch):
    torch.manual_seed(0)
    model = frozen(Stem())
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    fast = distill_data(model, (3, 24, 24), num_samples=4, iters=5, seed=1, progress=False)

    class Off(FastStemGrad):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr("pyzeroq.conv_grad.FastStemGrad", Off)
    plain = distill_data(model, (3, 24, 24), num_samples=4, iters=5, seed=1, progress=False)
    assert fast.initial_loss == plain.initial_loss
    torch.testing.assert_close(fast.data, plain.data, rtol=1e-4, atol=1e-4)


def test_polyphase_grad_in_float32_channels_last():
    g = torch.Generator().manual_seed(3)
    for n, h in itertools.product((1, 4), (32, 33)):
        x = torch.randn(n, 3, h, h, generator=g).contiguous(memory_format=torch.channels_last)
        w = torch.randn(16, 3, 7, 7, generator=g)
        go = torch.randn(F.conv2d(x, w, stride=2, padding=3).shape, generator=g)
        go = go.contiguous(memory_format=torch.channels_last)
        ref = torch_input_grad(go, x, w, (2, 2), (3, 3))
        torch.testing.assert_close(polyphase_input_grad(go, w, (h, h), (2, 2), (3, 3)), ref, rtol=1e-4, atol=1e-4)
