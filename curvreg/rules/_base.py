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
    """

    grads: GradsFn
    sq_norms: Optional[SqNormsFn] = None


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


class _GramSqNorm(torch.autograd.Function):
    """s_k = sum_{t,s} (A A^T)_{ts} (B B^T)_{ts} per group k; backward from the two Grams:
    ds/dA = 2 (B B^T) A and ds/dB = 2 (A A^T) B (both Grams are symmetric).

    Autograd's own backward of the same expression needs four batched products, two of them
    with a transposed operand and result ([p, T] x [T, T]), which ran 20-40x below the machine's
    matmul speed on the CPU; this is two plain [T, T] x [T, p] products. Under create_graph the
    Grams are recomputed from (A, B) with differentiable ops, so higher derivatives stay exact.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ga, gb = torch.bmm(a, a.transpose(1, 2)), torch.bmm(b, b.transpose(1, 2))
        ctx.save_for_backward(a, b)
        ctx.grams = (ga, gb)
        return (ga * gb).sum((1, 2))

    @staticmethod
    def backward(ctx, s_bar: Tensor):
        a, b = ctx.saved_tensors
        ga, gb = ctx.grams
        if torch.is_grad_enabled() or ga is None:  # create_graph, or a second backward
            ga, gb = torch.bmm(a, a.transpose(1, 2)), torch.bmm(b, b.transpose(1, 2))
        else:
            ctx.grams = (None, None)  # freed after the one backward that needs them
        scale = (2 * s_bar).reshape(-1, 1, 1)
        da = torch.bmm(gb * scale, a) if ctx.needs_input_grad[0] else None
        db = torch.bmm(ga * scale, b) if ctx.needs_input_grad[1] else None
        return da, db


def gram_sq_norm(a: Tensor, b: Tensor) -> Tensor:
    """||sum_t b_t a_t^T||_F^2 = sum_{t,s} <a_t,a_s><b_t,b_s> for ``a: [G, T, p]``, ``b: [G, T, q]``."""
    return _GramSqNorm.apply(a, b)


class _OuterSqNorm(torch.autograd.Function):
    """s_k = ||B_k^T A_k||_F^2 per group (the materialized form of a sequence layer's weight
    norm) for ``a: [G, T, p]``, ``b: [G, T, q]``; backward from M = B^T A:
    ds/dA = 2 B M and ds/dB = 2 A M^T, with contiguous operands (autograd's backward of the
    same expression runs its products on transposed views). Under create_graph M is recomputed
    with differentiable ops, so higher derivatives stay exact."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        m = torch.bmm(b.transpose(1, 2).contiguous(), a)  # [G, q, p]
        ctx.save_for_backward(a, b)
        ctx.m = m
        return torch.linalg.vector_norm(m.flatten(1), dim=1).square()

    @staticmethod
    def backward(ctx, s_bar: Tensor):
        a, b = ctx.saved_tensors
        m = ctx.m
        if torch.is_grad_enabled() or m is None:  # create_graph, or a second backward
            m = torch.bmm(b.transpose(1, 2), a)
        else:
            ctx.m = None
        h = m * (2 * s_bar).reshape(-1, 1, 1)
        da = torch.bmm(b, h) if ctx.needs_input_grad[0] else None
        db = torch.bmm(a, h.transpose(1, 2).contiguous()) if ctx.needs_input_grad[1] else None
        return da, db


def outer_sq_norm(a: Tensor, b: Tensor) -> Tensor:
    """||sum_t b_t a_t^T||_F^2 for ``a: [G, T, p]``, ``b: [G, T, q]``, by materializing the sum."""
    return _OuterSqNorm.apply(a, b)
