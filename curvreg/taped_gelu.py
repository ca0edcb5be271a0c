"""GELU inside the tape, with a second derivative computed in place.

The training backward of a regularized step differentiates the delta pass, so every GELU's
input gradient g * gelu'(x) is differentiated once more. PyTorch writes that second derivative
as a chain of out-of-place elementwise ops over the activation (for the tanh form more than
ten, each a fresh [N, T, 4d] tensor); on a CPU the fresh allocations cost more than the
arithmetic. Here the forward and the input gradient are PyTorch's own kernels (``F.gelu`` and
``gelu_backward``, the same values bit for bit), and the second derivative is

    exact:  gelu''(x) = phi(x) (2 - x^2)
    tanh:   gelu''(x) = (1 - t^2) (u' - x t u'^2 + 3 k c x^2),
            t = tanh(u), u = k (x + c x^3), u' = k (1 + 3 c x^2), k = sqrt(2 / pi), c = 0.044715

computed with two temporaries and in-place ops when no graph is being built; when one is (a
third derivative, ``create_graph=True`` on the training backward) the same formulas run
out of place, so every order stays differentiable. Only the tape routes F.gelu here.

``TANH_GELU_MODULES`` names activation modules that compute the tanh GELU with Python
arithmetic (Hugging Face's ``gelu_new``, GPT-2's default); inside the tape their calls run as
``F.gelu(x, approximate="tanh")``, the same function (values agree to rounding).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_K = math.sqrt(2.0 / math.pi)
_C = 0.044715
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# (module, qualified class name): modules whose forward is exactly
# 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
TANH_GELU_MODULES = frozenset({("transformers.activations", "NewGELUActivation")})


def computes_tanh_gelu(module: torch.nn.Module) -> bool:
    """Whether ``module`` is one of ``TANH_GELU_MODULES`` with its own, unpatched forward."""
    cls = type(module)
    return ((cls.__module__, cls.__qualname__) in TANH_GELU_MODULES
            and cls.forward.__qualname__ == f"{cls.__qualname__}.forward"
            and "forward" not in module.__dict__)


def tanh_gelu(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_input(args, kwargs):
    """``(x, approximate)`` of an F.gelu call whose input needs a gradient, else None."""
    x = args[0] if args else kwargs.get("input")
    approximate = args[1] if len(args) > 1 else kwargs.get("approximate", "none")
    if not isinstance(x, Tensor) or not x.requires_grad or approximate not in ("none", "tanh"):
        return None
    return x, approximate


def second_derivative(x: Tensor, approximate: str) -> Tensor:
    """gelu''(x): in place on two temporaries unless a graph is being built."""
    if torch.is_grad_enabled():
        return _second_differentiable(x, approximate)
    x2 = x * x
    if approximate == "none":
        return torch.exp(x2 * -0.5).mul_(_INV_SQRT_2PI).mul_(x2.neg_().add_(2.0))
    t = torch.tanh(x2.mul(_C).add_(1.0).mul_(x).mul_(_K))
    du = x2.mul(3 * _K * _C).add_(_K)                       # u'
    r = x2.mul_(3 * _K * _C).add_(du)                       # u' + 3 k c x^2
    r.sub_(du.mul_(du).mul_(t).mul_(x))                     # - x t u'^2
    return r.mul_(t.mul_(t).neg_().add_(1.0))               # * (1 - t^2)


def _second_differentiable(x: Tensor, approximate: str) -> Tensor:
    x2 = x * x
    if approximate == "none":
        return torch.exp(x2 * -0.5) * _INV_SQRT_2PI * (2.0 - x2)
    t = torch.tanh(_K * x * (1.0 + _C * x2))
    du = _K * (1.0 + 3 * _C * x2)
    return (1.0 - t * t) * (du - x * t * du * du + 3 * _K * _C * x2)


class TapedGelu(torch.autograd.Function):
    """y = F.gelu(x, approximate), whose input gradient is a ``GeluGrad``."""

    generate_vmap_rule = True  # usable under torch.func (vmap, jvp) too

    @staticmethod
    def forward(x: Tensor, approximate: str) -> Tensor:
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.approximate = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def jvp(ctx, x_dot: Tensor, _approximate):
        x, = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(x_dot, x, approximate=ctx.approximate)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, = ctx.saved_tensors
        return GeluGrad.apply(g, x, ctx.approximate), None


class GeluGrad(torch.autograd.Function):
    """g * gelu'(x) (PyTorch's ``gelu_backward``), with ``second_derivative`` as its x-derivative."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g: Tensor, x: Tensor, approximate: str) -> Tensor:
        return torch.ops.aten.gelu_backward(g, x, approximate=approximate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, x, ctx.approximate = inputs
        ctx.save_for_backward(g, x)
        ctx.save_for_forward(g, x)

    @staticmethod
    def jvp(ctx, g_dot, x_dot, _approximate):
        g, x = ctx.saved_tensors
        a = ctx.approximate
        out = 0
        if g_dot is not None:
            out = torch.ops.aten.gelu_backward(g_dot, x, approximate=a)
        if x_dot is not None:
            out = out + _second_differentiable(x, a) * g * x_dot
        return out

    @staticmethod
    def backward(ctx, gg: Tensor):
        g, x = ctx.saved_tensors
        a = ctx.approximate
        dg = GeluGrad.apply(gg, x, a) if ctx.needs_input_grad[0] else None
        dx = None
        if ctx.needs_input_grad[1]:
            d2 = second_derivative(x, a)
            dx = d2 * gg * g if torch.is_grad_enabled() else d2.mul_(gg).mul_(g)
        return dg, dx, None
