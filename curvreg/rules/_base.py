"""The rule protocol shared by every layer family.

Definitions (used by every rule): for example i with loss l_i, g_i = d l_i / d theta (not
divided by N). With ``group`` = m > 1 the examples are split into G = N / m disjoint groups of m
consecutive examples, and a rule returns the *unscaled* group sums S_k = sum_{i in group k} g_i;
the tape divides by m to obtain the gradient of the group-mean loss.

A rule sees one call of one module: the positional ``inputs`` of that call, and ``grad_output``,
the gradient of sum_i l_i with respect to the call's output. Because l_i depends on example i
only, the slice ``grad_output[i]`` is d l_i / d output_i.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

GradsFn = Callable[[nn.Module, Sequence, object, Sequence[str], int], Dict[str, Tensor]]
SqNormsFn = Callable[[nn.Module, Sequence, object, Sequence[str], int], Tensor]


class LayerRule(NamedTuple):
    """Per-example gradient rule for one layer family.

    Attributes:
        grads: ``(layer, inputs, grad_output, names, group) -> {name: [G, *param.shape]}``, the
            per-group gradient sums S_k of each parameter in ``names``.
        sq_norms: optional ``(layer, inputs, grad_output, names, group) -> [G]``, the value
            sum_{p in names} ||S_k(p)||^2 computed without materializing S_k (the "ghost norm").
            When ``None`` the tape squares the output of ``grads``.
        with_output: the call's output is appended to ``inputs`` (a rule that reads a
            quantity the forward already computed instead of recomputing it); None if it was
            modified in place after the call, so the rule must be able to do without it.
    """

    grads: GradsFn
    sq_norms: Optional[SqNormsFn] = None
    with_output: bool = False


def fold_groups(t: Tensor, group: int) -> Tensor:
    """Reshape ``[N, T, ...]`` to ``[N // group, group * T, ...]``.

    A group of m examples behaves like one example whose positions are the m examples' positions
    concatenated, which is how every ghost-norm rule supports ``group_size``.
    """
    if group == 1:
        return t
    return t.reshape(t.shape[0] // group, group * t.shape[1], *t.shape[2:])


def sum_groups(t: Tensor, group: int) -> Tensor:
    """Sum ``[N, ...]`` over disjoint groups of ``group`` consecutive rows -> ``[N // group, ...]``."""
    if group == 1:
        return t
    return t.reshape(t.shape[0] // group, group, *t.shape[1:]).sum(1)


class _RowSqNorm(torch.autograd.Function):
    """s_i = ||t_i||^2 over all dims but the first; backward 2 s_bar_i t_i in one pass.

    ``t.pow(2).sum()`` spends an N x d temporary in forward and three elementwise passes in
    backward (pow's formula 2 t^1 s_bar); this is one reduction and one multiply. Its backward
    is built from differentiable ops, so higher derivatives stay exact.
    """

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        ctx.save_for_backward(t)
        return torch.linalg.vector_norm(t.flatten(1), dim=1).square()

    @staticmethod
    def backward(ctx, s_bar: Tensor) -> Tensor:
        (t,) = ctx.saved_tensors
        return t * (2 * s_bar).reshape(-1, *[1] * (t.dim() - 1))


def row_sq_norms(t: Tensor) -> Tensor:
    """``[N]``: ||t_i||^2 summed over every dim but the first (differentiable)."""
    return _RowSqNorm.apply(t)


def sq_from_grads(grads: Dict[str, Tensor]) -> Tensor:
    """sum_p ||S_k(p)||^2 from materialized per-group gradients."""
    return sum(row_sq_norms(g) for g in grads.values())


def _exponents(t: Tensor) -> Tensor:
    """``[G]`` integer e_k with max|t_k| = m 2^e_k, m in [0.5, 1) (0 for an all-zero group),
    floored at the smallest normal exponent so that 2^-e_k stays finite. (max and -min, not
    abs().amax(): the abs temporary cost ten times the two reductions on the CPU.)"""
    dims = tuple(range(1, t.dim()))
    big = torch.maximum(t.detach().amax(dims), -t.detach().amin(dims))
    return torch.frexp(big)[1].clamp_min(math.frexp(torch.finfo(t.dtype).tiny)[1])


def _ldexp(v: Tensor, e: Tensor) -> Tensor:
    """``v * 2^e`` for ``[G]`` values, in two halves so that an exponent past the float range
    in one step (a tiny scale times a large value) still lands right."""
    e = e.to(v.dtype)
    half = torch.trunc(e / 2)
    return v * torch.exp2(half) * torch.exp2(e - half)


class _Pow2Scales:
    """Per-group power-of-two scales (exact) of the two operands of a Gram or outer product
    ``A: [G, T, p]``, ``B: [G, T, q]``, that bring each group's largest entry into [0.5, 1).

    Why: the deltas of some layers are so small (a GPT-2 block's query and key projections at
    initialization) that their products are subnormal floats, which the CPU computes far
    slower: measured in a GPT-2 step, 55 ms per Gram unscaled, under 2 ms scaled. Only on the
    CPU (GPUs take subnormals at full speed), and only when some group of B (the deltas) has
    its largest entry outside [2^-20, 2^40]: otherwise the scaling passes cost more than they
    save. The check reads a CPU tensor (not a device sync); it decides speed, not the value.
    """

    def __init__(self, a: Tensor, b: Tensor):
        self.ea = self.eb = None
        if a.device.type == "cpu":
            eb = _exponents(b)
            if bool(((eb < -20) | (eb > 40)).any()):
                self.ea, self.eb = _exponents(a), eb

    def scaled(self, a: Tensor, b: Tensor):
        """(A, B) with each group scaled by 2^-e (differentiable; identity when unscaled)."""
        if self.ea is None:
            return a, b
        return tuple(t * torch.exp2(-e.to(t.dtype)).reshape(-1, 1, 1)
                     for t, e in ((a, self.ea), (b, self.eb)))

    def result(self, s: Tensor) -> Tensor:
        """The ``[G]`` value of the unscaled operands from that of the scaled ones
        (a product of two A entries and two B entries: 2^(2 ea + 2 eb))."""
        return s if self.ea is None else _ldexp(s, 2 * (self.ea + self.eb))

    def grad_factors(self, s_bar: Tensor):
        """``[G, 1, 1]`` factors of the scaled products in ds/dA (B B^T A: 2^(2 eb + ea)) and
        ds/dB (2^(2 ea + eb)), times 2 s_bar."""
        two = (2 * s_bar).reshape(-1, 1, 1)
        if self.ea is None:
            return two, two
        return (_ldexp(2 * s_bar, 2 * self.eb + self.ea).reshape(-1, 1, 1),
                _ldexp(2 * s_bar, 2 * self.ea + self.eb).reshape(-1, 1, 1))


def _bmm_times(x: Tensor, y: Tensor, f: Tensor) -> Tensor:
    """``bmm(x, y) * f`` for a ``[G, 1, 1]`` factor, applied to the smallest of x, y and the
    result (the [T, T] Gram rather than a [T, p] product: one pass over far fewer entries)."""
    sizes = (x.numel(), y.numel(), x.shape[0] * x.shape[1] * y.shape[2])
    smallest = sizes.index(min(sizes))
    if smallest == 0:
        return torch.bmm(x * f, y)
    if smallest == 1:
        return torch.bmm(x, y * f)
    return torch.bmm(x, y) * f


class _GramSqNorm(torch.autograd.Function):
    """s_k = sum_{t,s} (A A^T)_{ts} (B B^T)_{ts} per group k; backward from the two Grams:
    ds/dA = 2 (B B^T) A and ds/dB = 2 (A A^T) B (both Grams are symmetric).

    Autograd's own backward of the same expression needs four batched products, two of them
    with a transposed operand and result ([p, T] x [T, T]), which ran 20-40x below the machine's
    matmul speed on the CPU; this is two plain [T, T] x [T, p] products. Under create_graph the
    Grams are recomputed from (A, B) with differentiable ops, so higher derivatives stay exact.
    Operands far from unit size are scaled first (``_Pow2Scales``).
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        scales = _Pow2Scales(a, b)
        a_s, b_s = scales.scaled(a, b)
        ga, gb = torch.bmm(a_s, a_s.transpose(1, 2)), torch.bmm(b_s, b_s.transpose(1, 2))
        ctx.save_for_backward(a, b)
        ctx.scales, ctx.grams = scales, (ga, gb)
        return scales.result((ga * gb).sum((1, 2)))

    @staticmethod
    def backward(ctx, s_bar: Tensor):
        a, b = ctx.saved_tensors
        scales, (ga, gb) = ctx.scales, ctx.grams
        a_s, b_s = scales.scaled(a, b)  # differentiable in (a, b)
        if torch.is_grad_enabled() or ga is None:  # create_graph, or a second backward
            ga, gb = torch.bmm(a_s, a_s.transpose(1, 2)), torch.bmm(b_s, b_s.transpose(1, 2))
        else:
            ctx.grams = (None, None)  # freed after the one backward that needs them
        fa, fb = scales.grad_factors(s_bar)
        da = _bmm_times(gb, a_s, fa) if ctx.needs_input_grad[0] else None
        db = _bmm_times(ga, b_s, fb) if ctx.needs_input_grad[1] else None
        return da, db


def gram_sq_norm(a: Tensor, b: Tensor) -> Tensor:
    """||sum_t b_t a_t^T||_F^2 = sum_{t,s} <a_t,a_s><b_t,b_s> for ``a: [G, T, p]``, ``b: [G, T, q]``."""
    return _GramSqNorm.apply(a, b)


class _OuterSqNorm(torch.autograd.Function):
    """s_k = ||B_k^T A_k||_F^2 per group (the materialized form of a sequence layer's weight
    norm) for ``a: [G, T, p]``, ``b: [G, T, q]``; backward from M = B^T A:
    ds/dA = 2 B M and ds/dB = 2 A M^T, with contiguous operands (autograd's backward of the
    same expression runs its products on transposed views). Under create_graph M is recomputed
    with differentiable ops, so higher derivatives stay exact. Operands far from unit size are
    scaled first (``_Pow2Scales``)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        scales = _Pow2Scales(a, b)
        a_s, b_s = scales.scaled(a, b)
        m = torch.bmm(b_s.transpose(1, 2).contiguous(), a_s)  # [G, q, p]
        ctx.save_for_backward(a, b)
        ctx.scales, ctx.m = scales, m
        return scales.result(torch.linalg.vector_norm(m.flatten(1), dim=1).square())

    @staticmethod
    def backward(ctx, s_bar: Tensor):
        a, b = ctx.saved_tensors
        scales, m = ctx.scales, ctx.m
        a_s, b_s = scales.scaled(a, b)  # differentiable in (a, b)
        if torch.is_grad_enabled() or m is None:  # create_graph, or a second backward
            m = torch.bmm(b_s.transpose(1, 2), a_s)
        else:
            ctx.m = None
        fa, fb = scales.grad_factors(s_bar)
        da = _bmm_times(b_s, m, fa) if ctx.needs_input_grad[0] else None
        db = _bmm_times(a_s, m.transpose(1, 2).contiguous(), fb) if ctx.needs_input_grad[1] else None
        return da, db


def outer_sq_norm(a: Tensor, b: Tensor) -> Tensor:
    """||sum_t b_t a_t^T||_F^2 for ``a: [G, T, p]``, ``b: [G, T, q]``, by materializing the sum."""
    return _OuterSqNorm.apply(a, b)
