"""Exact fallback for parameter uses no rule covers: a per-example loop over the module.

For one recorded call y = f(theta, x) of module M whose own ops use parameters theta in ways no
op rule covers, example i's gradient is the vector-Jacobian product
    g_i = (d f(theta, x_i) / d theta)^T delta_i,
computed by re-running M on example i alone (a batch of one) and one ``autograd.grad``. This is
the batch-size-1 loop itself, so its value and its derivatives (``create_graph``) are those of
plain autograd: no batching transform is involved. (``torch.func.vmap`` was used here before;
its double backward through layer_norm and batch_norm is wrong, and it cannot run nn.LSTM.)

Only M's *own* uncovered uses are differentiated: during the re-run, each such use sees an alias
of the parameter (``p.view_as(p)``, differentiable in p), while uses inside child modules and
uses that an op rule covers see the parameter itself, whose contributions the tape counts
elsewhere. The re-run is compared with the recorded output, which catches modules that mix
examples or are random. Cost: N forward and backward passes of M.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Sequence

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ..batchnorm import one_example_layout
from ._base import sum_groups

# (func, args, kwargs) -> ids of the parameters an op rule covers in that call
Covered = Callable[[object, tuple, dict], set]


class _Substitute(TorchFunctionMode):
    """Give M's own uncovered parameter uses the aliases; everything else the parameters."""

    def __init__(self, aliases: Dict[int, Tensor], covered: Covered):
        super().__init__()
        self.aliases, self.covered, self.depth = aliases, covered, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth == 0:
            skip = self.covered(func, args, kwargs)
            swap = lambda t: (self.aliases[id(t)]  # noqa: E731
                              if isinstance(t, nn.Parameter) and id(t) in self.aliases
                              and id(t) not in skip else t)
            args, kwargs = tree_map(swap, (tuple(args), kwargs))
        return one_example_layout(func, args, kwargs, func(*args, **kwargs))  # one example


@contextmanager
def _children_tracked(module: nn.Module, mode: _Substitute):
    """While active, ``mode.depth`` counts the child modules of ``module`` being run."""
    def enter(*_):
        mode.depth += 1

    def leave(*_):
        mode.depth -= 1

    handles = []
    try:
        for child in module.modules():
            if child is not module:
                handles.append(child.register_forward_pre_hook(enter))
                handles.append(child.register_forward_hook(leave))
        yield
    finally:
        for h in handles:
            h.remove()


def input_dims(module: nn.Module, flat_args: Sequence, n: int):
    """The example dim of each flattened input of ``module`` (None: shared by all examples)."""
    seq_first = ((isinstance(module, nn.RNNBase) and not module.batch_first)
                 or (isinstance(module, nn.MultiheadAttention) and not module.batch_first))
    dims = []
    for i, a in enumerate(flat_args):
        if not isinstance(a, Tensor) or a.dim() == 0:
            dims.append(None)
            continue
        d = 0
        if isinstance(module, nn.RNNBase):
            d = 0 if (i == 0 and module.batch_first) else 1  # hx, cx: [L, N, H]
        elif seq_first and a.dim() == 3 and a.is_floating_point():
            d = 1
        dims.append(d if a.dim() > d and a.shape[d] == n else None)
    return dims


def fallback_grads(call, grad_outputs: Sequence, names: Sequence[str], group: int, n: int,
                   covered: Covered) -> Dict[str, Tensor]:
    """Per-group gradient sums ``{name: [N // group, *shape]}`` of ``names``' uncovered uses in
    one recorded call (``call.module``, ``.args``, ``.kwargs``, ``.outputs``, ``.index``,
    ``.dims``, ``.path``)."""
    module = call.module
    owned = dict(module.named_parameters())
    wanted = {k: owned[k] for k in names}
    flat_args, spec = tree_flatten((call.args, call.kwargs or {}))
    dims = input_dims(module, flat_args, n)
    create_graph = torch.is_grad_enabled()
    per_example = {k: [] for k in names}
    for i in range(n):
        flat = [a.narrow(d, i, 1) if d is not None else a for a, d in zip(flat_args, dims)]
        args, kwargs = spec.unflatten(flat)
        with torch.enable_grad():
            aliases = {k: p.view_as(p) for k, p in wanted.items()}
            mode = _Substitute({id(wanted[k]): a for k, a in aliases.items()}, covered)
            with sdpa_kernel(SDPBackend.MATH), _children_tracked(module, mode), mode:
                out = module(*args, **kwargs)
        floats = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()]
        outs = [floats[j] for j in call.index] if len(floats) > max(call.index) else []
        same = len(outs) == len(call.outputs) and all(
            o.shape == r.narrow(d, i, 1).shape
            and torch.allclose(o.detach(), r.detach().narrow(d, i, 1), rtol=1e-4, atol=1e-5)
            for o, r, d in zip(outs, call.outputs, call.dims))
        if not same:
            raise ValueError(
                f"module '{call.path}' ({type(module).__name__}) gives different outputs when run "
                "one example at a time, so its forward mixes examples (or is random). Per-example "
                "gradients cannot be separated for it; switch it to eval mode, use a per-example "
                "variant (e.g. GroupNorm instead of BatchNorm), or pass an exact rule.")
        pairs = [(o, g.narrow(d, i, 1)) for o, g, d in zip(outs, grad_outputs, call.dims)
                 if g is not None and o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], list(aliases.values()),
                                    [g for _, g in pairs], create_graph=create_graph,
                                    allow_unused=True) if pairs else [None] * len(aliases)
        for k, g in zip(aliases, grads):
            per_example[k].append(torch.zeros_like(wanted[k]) if g is None else g)
    return {k: sum_groups(torch.stack(v), group) for k, v in per_example.items()}
