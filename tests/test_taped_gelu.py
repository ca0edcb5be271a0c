"""GELU inside the tape (curvreg.taped_gelu): PyTorch's values, derivatives right to every order,
and the tape exact through it against the batch-size-1 loop and torch.func in float64."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import curvreg
from curvreg import taped_gelu
from curvreg.reference import loop_sq_grad_norms, vmap_sq_grad_norms
from curvreg.taped_gelu import GeluGrad, TapedGelu


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_forward_and_input_gradient_are_pytorchs_kernels_bit_for_bit(approximate):
    x = torch.randn(3, 5, 7, requires_grad=True)
    g = torch.randn(3, 5, 7)
    y = TapedGelu.apply(x, approximate)
    assert torch.equal(y, F.gelu(x, approximate=approximate))
    gx, = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, torch.ops.aten.gelu_backward(g, x, approximate=approximate))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_second_derivative_matches_pytorchs_double_backward(approximate):
    """Both paths of second_derivative (in place, and differentiable under grad mode) against
    PyTorch's own double backward, over a range that includes the tails."""
    x = torch.linspace(-9, 9, 2001, dtype=torch.float64, requires_grad=True)
    d1, = torch.autograd.grad(F.gelu(x, approximate=approximate).sum(), x, create_graph=True)
    ref, = torch.autograd.grad(d1.sum(), x)
    with torch.no_grad():
        fast = taped_gelu.second_derivative(x.detach(), approximate)
    slow = taped_gelu.second_derivative(x.detach(), approximate)  # grad mode: out of place
    assert (fast - ref).abs().max() < 1e-13 and (slow - ref).abs().max() < 1e-13  # |ref| <= 0.8


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gradcheck_to_third_order(approximate):
    """gradgradcheck of GeluGrad differentiates its backward: the out-of-place path."""
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(9, dtype=torch.float64, generator=gen)).requires_grad_()
    g = torch.randn(9, dtype=torch.float64, generator=gen, requires_grad=True)
    f = lambda x: TapedGelu.apply(x, approximate)  # noqa: E731
    h = lambda g, x: GeluGrad.apply(g, x, approximate)  # noqa: E731
    assert gradcheck(f, (x,)) and gradgradcheck(f, (x,))
    assert gradcheck(h, (g, x)) and gradgradcheck(h, (g, x))


def _python_tanh_gelu():
    pytest.importorskip("transformers")
    from transformers.activations import NewGELUActivation
    return NewGELUActivation()


def _mlp(act):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), act, nn.Linear(12, 12), nn.GELU(approximate="tanh"),
                         nn.Linear(12, 3)).double()


@pytest.mark.parametrize("act", ["exact", "tanh", "python_tanh"])
def test_tape_through_gelu_is_exact_and_takes_the_route(act, monkeypatch):
    module = {"exact": nn.GELU, "tanh": lambda: nn.GELU(approximate="tanh"),
              "python_tanh": _python_tanh_gelu}[act]()
    model = _mlp(module)
    calls = []
    forward = TapedGelu.forward
    monkeypatch.setattr(TapedGelu, "forward",
                        staticmethod(lambda x, a: calls.append(a) or forward(x, a)))
    x = torch.randn(5, 6, dtype=torch.float64) * 2
    y = torch.randint(0, 3, (5,))
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    sq = tape.per_example_sq_grad_norms(ce(out, y))
    assert calls == [{"exact": "none"}.get(act, "tanh"), "tanh"]
    assert "forward" not in module.__dict__  # the Python GELU's forward is its own again
    ref = loop_sq_grad_norms(model, ce, x, y, create_graph=True)
    assert rel_err(sq, ref) < 1e-10
    assert rel_err(sq, vmap_sq_grad_norms(model, ce, x, y)) < 1e-10
    params = list(model.parameters())
    ours = torch.autograd.grad(sq.mean(), params)
    theirs = torch.autograd.grad(ref.mean(), params)
    assert max(rel_err(a, b) for a, b in zip(ours, theirs)) < 1e-9


def test_python_tanh_gelu_is_the_same_function_and_is_restored_after_an_error():
    module = _python_tanh_gelu()
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    assert (module(x) - taped_gelu.tanh_gelu(x)).abs().max() < 1e-15
    assert taped_gelu.computes_tanh_gelu(module)
    model = _mlp(module)
    with pytest.raises(RuntimeError, match="boom"):
        with curvreg.GradNormTape(model):
            assert module.forward is taped_gelu.tanh_gelu
            raise RuntimeError("boom")
    assert "forward" not in module.__dict__ and module.forward.__func__ is type(module).forward


def test_a_subclass_or_patched_forward_keeps_its_own_forward():
    module = _python_tanh_gelu()

    class Scaled(type(module)):
        def forward(self, x):
            return 2 * super().forward(x)

    patched = _python_tanh_gelu()
    patched.forward = lambda x: x
    assert not taped_gelu.computes_tanh_gelu(Scaled())
    assert not taped_gelu.computes_tanh_gelu(patched)
    assert math.isclose(taped_gelu._K, math.sqrt(2 / math.pi))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_forward_mode_matches_pytorch(approximate):
    """Forward mode (jvp) of both functions, and of the input gradient's tangent, against F.gelu's."""
    from torch.func import jvp
    gen = torch.Generator().manual_seed(1)
    x, xd, g, gd = (torch.randn(11, dtype=torch.float64, generator=gen) for _ in range(4))
    ours = jvp(lambda x: TapedGelu.apply(x, approximate), (x,), (xd,))
    ref = jvp(lambda x: F.gelu(x, approximate=approximate), (x,), (xd,))
    assert all(torch.allclose(a, b, rtol=1e-13, atol=0) for a, b in zip(ours, ref))
    h = lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate=approximate)  # noqa: E731
    ours = jvp(lambda g, x: GeluGrad.apply(g, x, approximate), (g, x), (gd, xd))
    ref = jvp(h, (g, x), (gd, xd))
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(ours, ref))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_vmap_of_second_derivatives_matches_pytorch(approximate):
    """Under torch.func (vmap of grad of grad), as a generic probe tangent may run it."""
    from torch.func import grad, vmap
    x = torch.randn(4, 6, dtype=torch.float64)

    def second(f):
        return vmap(grad(lambda x: grad(lambda x: f(x).sum())(x).pow(2).sum()))(x)
    ours = second(lambda x: TapedGelu.apply(x, approximate))
    ref = second(lambda x: F.gelu(x, approximate=approximate))
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-14)
