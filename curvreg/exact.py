"""The exact estimator: per-example (per-group) squared norms from each call's rule, or from
the per-example loop fallback where no rule covers a use.

A parameter used by one call adds that call's sum_p ||g_i(p)||^2 (the rule's ``sq_norms``, with
no per-example gradient formed). A parameter used by several calls (a shared weight, views of
one parameter) must have its per-example gradients summed before the square: those calls give
their gradients (``rule.grads``) and the sums are squared together.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Callable, Optional

import torch
from torch import Tensor

from .rules import LayerRule, fallback_grads, sq_from_grads


class FallbackWarning(UserWarning):
    """Some modules have no exact rule and use the slower per-example VJP fallback."""


_LOW = (torch.bfloat16, torch.float16)


def promote_one(t):
    """A bf16/fp16 tensor as float32 (the mixed-precision policy); anything else as it is."""
    return t.float() if isinstance(t, Tensor) and t.dtype in _LOW else t


def promote(args: tuple, delta: Tensor):
    """(args, delta) with bf16/fp16 tensors as float32."""
    return tuple(promote_one(a) for a in args), promote_one(delta)


def example_view(c, delta: Tensor, n: Optional[int]):
    """(inputs, delta) of a call with the example dimension first and unmerged, as the rules
    read them. A position-wise op whose leading dim is k * N (examples merged with positions,
    example-major) is viewed as [N, k, ...]; the independence check verifies that reading."""
    if not c.position_wise or n is None or delta.shape[0] == n:
        return c.args, delta
    k = delta.shape[0] // n
    x = c.args[0]
    return ((x.reshape(n, k, *x.shape[1:]),) + tuple(c.args[1:]),
            delta.reshape(n, k, *delta.shape[1:]))


def merged_rows(delta: Tensor, n: Optional[int]) -> int:
    """k for a call whose leading dim (after ``example_view``) is k * N, the examples merged with
    another axis, example-major (a convolution on window attention's heads, [N * heads, C, H, W]):
    its rule runs with groups k times as large, each example's k rows summed as a group's; the
    independence check verifies the reading. 1 for an ordinary call."""
    return delta.shape[0] // n if n and delta.shape[0] > n else 1


def _sq_via_grads(rule: LayerRule):
    return lambda *a: sq_from_grads(rule.grads(*a))


def exact_sq_norms(live, plan, n: int, m: int, rule_of: Callable, covered: Callable) -> Optional[Tensor]:
    """Sum over the live calls ((call, deltas)) of the exactly computed norms of the names
    ``plan`` gives each ((exact names, probed names)); None if there are none. ``rule_of(call)``
    is its rule (None: the fallback), ``covered`` tells the fallback's re-run which parameters
    an op rule already takes."""
    owners = Counter(key for (c, _), (names, _) in zip(live, plan)
                     for k, key in zip(c.names, c.keys) if k in names)
    total, shared, fallbacks = None, {}, []
    for (c, d), (names, _) in zip(live, plan):
        if not names:
            continue
        keys = [key for k, key in zip(c.names, c.keys) if k in names]
        single = [k for k, key in zip(names, keys) if owners[key] == 1]
        multi = [k for k, key in zip(names, keys) if owners[key] > 1]
        rule = rule_of(c)
        if rule is not None and len(d) == 1 and all(k in c.module._parameters for k in names):
            args, delta = promote(*example_view(c, d[0], n))
            group = m * merged_rows(delta, n)
            if rule.with_output:
                args = args + (promote_one(c.output),)  # None: modified in place
            if single:
                sq = (rule.sq_norms or _sq_via_grads(rule))(c.module, args, delta, single, group)
                total = sq if total is None else total + sq
            grads = rule.grads(c.module, args, delta, multi, group) if multi else {}
        else:
            fallbacks.append(c.where)
            grads = fallback_grads(c, d, names, m, n, covered)
            single_grads = {k: v for k, v in grads.items() if k in single}
            if single_grads:
                sq = sq_from_grads(single_grads)
                total = sq if total is None else total + sq
            grads = {k: v for k, v in grads.items() if k not in single}
        for k, key in zip(names, keys):
            if k in grads:
                g = grads[k].reshape(grads[k].shape[0], -1)  # views share a parameter's key
                shared[key] = g if key not in shared else shared[key] + g
    if shared:
        sq = sq_from_grads(shared)
        total = sq if total is None else total + sq
    if fallbacks:
        warnings.warn("curvreg: no exact rule for these uses of parameters; using the "
                      "per-example loop fallback (slower): " + ", ".join(sorted(set(fallbacks))),
                      FallbackWarning, stacklevel=4)
    return total

