"""Exact fallback for any other module whose forward treats examples independently.

For one recorded call y = f(theta, x) of module M, example i's gradient with respect to the
parameters M used directly is the vector-Jacobian product
    g_i = (d f(theta, x_i) / d theta)^T delta_i,
evaluated for all i at once with ``torch.func.vmap`` over ``torch.func.vjp`` of M alone. The
forward is re-run per example (batch of one), so it costs about one extra forward and backward
of M; the result is checked against the recorded output, which catches modules that mix
examples. Stays differentiable: regular autograd flows through the functorch transforms.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Sequence

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten

from ._base import sum_groups


def fallback_grads(module: nn.Module, path: str, args: tuple, kwargs: dict, outputs: Sequence,
                   grad_outputs: Sequence, names: Sequence[str], group: int, n: int,
                   ) -> Dict[str, Tensor]:
    """Per-group gradient sums ``{name: [N // group, *shape]}`` for parameters ``names`` of ``module``."""
    state = dict(module.named_parameters())
    state.update(module.named_buffers())
    wanted = {k: state[k] for k in names}
    batched = lambda t: isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n  # noqa: E731
    flat_args, spec = tree_flatten((args, kwargs))
    arg_dims = [0 if batched(a) else None for a in flat_args]
    cots = [torch.zeros_like(o) if d is None else d for o, d in zip(outputs, grad_outputs)]

    def one_example(flat_i, cot_i):
        flat = [a.unsqueeze(0) if dim == 0 else a for a, dim in zip(flat_i, arg_dims)]
        a, kw = spec.unflatten(flat)

        def run(params):
            out = functional_call(module, {**state, **params}, a, kw)
            return tuple(t for t in tree_flatten(out)[0] if isinstance(t, Tensor)
                         and t.is_floating_point())

        primal, pullback = vjp(run, wanted)
        return pullback(tuple(c.unsqueeze(0) for c in cot_i))[0], primal

    with _children_see_constants(module, names), sdpa_kernel(SDPBackend.MATH):
        grads, primal = vmap(one_example, in_dims=(arg_dims, 0), randomness="error")(flat_args, cots)
    for p, o in zip(primal, outputs):
        if p.shape[0] != n or not torch.allclose(p.squeeze(1), o.detach(), rtol=1e-4, atol=1e-5):
            raise ValueError(
                f"module '{path}' ({type(module).__name__}) gives different outputs when run one "
                "example at a time, so its forward mixes examples (or is random). Per-example "
                "gradients are undefined for it; switch it to eval mode, use a per-example "
                "variant (e.g. GroupNorm instead of BatchNorm), or pass an exact rule.")
    return {k: sum_groups(g, group) for k, g in grads.items()}


@contextmanager
def _children_see_constants(module: nn.Module, names: Sequence[str]):
    """While re-running ``module``, let each child that owns a differentiated parameter see the
    parameter's constant value inside its own forward.

    The fallback differentiates only the uses of a parameter made by ``module`` itself (e.g. a
    tied embedding matrix reused in the parent's ``F.linear``); the child's own use is covered by
    the child's rule, so it must not be counted twice.
    """
    owners = {}
    for name in names:
        if "." in name:
            path, leaf = name.rsplit(".", 1)
            owners.setdefault(path, []).append(leaf)
    handles, saved = [], []
    originals = {path: {k: module.get_submodule(path)._parameters[k] for k in leaves}
                 for path, leaves in owners.items()}

    def pre(child, _args, leaves, path):
        saved.append({k: child._parameters[k] for k in leaves})
        child._parameters.update(originals[path])  # constant for the vjp, live for autograd

    def post(child, _args, _out):
        child._parameters.update(saved.pop())

    try:
        for path, leaves in owners.items():
            child = module.get_submodule(path)
            handles.append(child.register_forward_pre_hook(
                lambda c, a, lv=leaves, p=path: pre(c, a, lv, p)))
            handles.append(child.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()
