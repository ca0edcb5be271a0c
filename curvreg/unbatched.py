"""Rule-op outputs without an example dimension, expanded to the batch where they meet it.

A rule reads row i of the gradient at an op's output as d l_i / d y_i. An op whose input has no
example dimension (a position table looked up with ids of shape [1, T], a convolution of a fixed
grid, T5's relative position bias from [T, T] buckets) gives an output shared by all examples,
and autograd sums its gradient over them. Where such an output t meets the batch, it is replaced
by its expansion to the batch, which computes the same values and whose gradient row i is
d l_i / d t; the op's recorded call is re-pointed at the expansion, its inputs expanded alike, so
its rule sees an ordinary per-example call. t meets the batch

- at a broadcasting sum or product with batched data (``x + pos``: ``broadcast``),
- where it is tiled over the batch itself (``pos.repeat(N, 1, ...)``, ``pos.expand(N, ...)``:
  ``tile``),
- as the ``attn_mask`` of ``scaled_dot_product_attention`` (``batched_mask``),

where the batch may also be merged with another axis, example-major (window attention's
[N * W, ...]: each example's copy is repeated over its windows),

directly or through a chain of view ops on it (``follow``; replayed on each example's copy of t
by ``torch.vmap``). Each tensor is expanded once and every later use gets the same expansion. Any
other use of t is caught at the delta pass: the gradient at t (the call's ``origin``) must equal
the expansion's rows summed.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten

# ops at which an output is expanded where it meets batched data (``Unbatched.broadcast``)
BROADCASTING = frozenset({torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__,
                          Tensor.add_, torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__})

# ops that tile an output over the batch (``Unbatched.tile``)
TILING = frozenset({Tensor.expand, Tensor.repeat})

# view ops followed from an output (``Unbatched.follow``): T5's relative position bias,
# embedding(buckets [T, T]).permute(2, 0, 1).unsqueeze(0)[:, :, -T:, :], then a torch.where
# with a fixed causal mask
VIEW_CHAIN = frozenset({Tensor.permute, torch.permute, Tensor.unsqueeze, torch.unsqueeze,
                        Tensor.transpose, torch.transpose, Tensor.__getitem__, Tensor.reshape,
                        Tensor.view, Tensor.squeeze, Tensor.flatten, Tensor.contiguous,
                        torch.where})


class Unbatched:
    """The unbatched rule-op outputs of one taped forward (batch size ``n``), their views, and
    their expansions to the batch. Entries are keyed by ``id`` and hold the tensor itself, which
    they check, so a reused id never matches."""

    def __init__(self):
        self.outputs: Dict[int, tuple] = {}    # id(t) -> (its call, t), until expanded
        self.views: Dict[int, tuple] = {}      # id(v) -> (v, the output t, ops from t to v)
        self.roots: Dict[int, tuple] = {}      # id(t) -> (t, [n, *t.shape]) for views of t
        self.expanded: Dict[tuple, tuple] = {}  # (id(v), dims) -> (v, its expansion)

    def __bool__(self) -> bool:
        return bool(self.outputs or self.views)

    def add(self, call, out: Tensor) -> None:
        """``out``, the output of rule call ``call``, has no example dimension."""
        self.outputs[id(out)] = (call, out)

    def broadcast(self, args, n: int):
        """``args`` of a broadcasting op, an unbatched operand meeting a batched one replaced by
        its expansion: ``x + pos`` with pos [1, T, d] or [T, d] and x [N, T, d]."""
        a, b = args
        for i, (t, other) in enumerate(((a, b), (b, a))):
            if (isinstance(t, Tensor) and isinstance(other, Tensor) and other.dim() >= t.dim()
                    and other.dim() > 0 and _batched(other.shape[0], n)):
                rep = self._merged(t, other.dim(), n, other.shape[0])
                if rep is not None:
                    return (rep, b) if i == 0 else (a, rep)
        return args

    def tile(self, func, args, kwargs, n: int) -> Optional[Tensor]:
        """The expansion that ``t.expand(n, ...)`` or ``t.repeat(n, 1, ...)`` makes of an
        unbatched t with a leading size of 1 or none (XCiT's Fourier position encoding:
        ``.repeat(B, 1, 1, 1)``), else None."""
        if kwargs or len(args) < 2 or not isinstance(args[0], Tensor):
            return None
        t, sizes = args[0], args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
            sizes = tuple(sizes[0])
        pad = len(sizes) - t.dim()
        if not all(isinstance(s, int) for s in sizes) or sizes[0] != n or pad not in (0, 1):
            return None
        rest = (1,) * pad + tuple(t.shape)
        keep = (lambda s, k: s == 1) if func is Tensor.repeat else (lambda s, k: s in (-1, k))
        if rest[0] != 1 or not all(keep(s, k) for s, k in zip(sizes[1:], rest[1:])):
            return None
        return self._expansion(t, len(sizes), n)

    def batched_mask(self, args, kwargs, n: int):
        """(args, kwargs) of a scaled_dot_product_attention call whose ``attn_mask`` is unbatched
        (T5's relative position bias), the mask expanded to the query's batch (the kernel
        broadcasts it anyway)."""
        query = args[0] if args else kwargs.get("query")
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        if (not isinstance(query, Tensor) or not isinstance(mask, Tensor) or query.dim() == 0
                or not _batched(query.shape[0], n) or mask.dim() > query.dim()):
            return args, kwargs
        rep = self._merged(mask, query.dim(), n, query.shape[0])
        if rep is None:
            return args, kwargs
        if len(args) > 3:
            return args[:3] + (rep,) + tuple(args[4:]), kwargs
        return args, {**kwargs, "attn_mask": rep}

    def follow(self, func, args, kwargs, out, n: int) -> None:
        """Record ``out``, a view op's result on an unbatched output or on a view of one, with
        the ops that lead to it, unless the op also takes batched data (there it meets the
        batch, and one of the methods above expands it)."""
        if not isinstance(out, Tensor):
            return
        for i, base in enumerate(args):
            if not isinstance(base, Tensor):
                continue
            entry = self.outputs.get(id(base))
            if entry is not None and entry[1] is base:
                root, chain = base, ()
                break
            entry = self.views.get(id(base))
            if entry is not None and entry[0] is base:
                root, chain = entry[1], entry[2]
                break
        else:
            return
        if any(isinstance(a, Tensor) and a is not base and a.dim() > 0 and a.shape[0] == n
               for a in tree_flatten((args, kwargs))[0]):
            return
        self.views[id(out)] = (out, root, chain + ((func, i, tuple(args), kwargs),))

    def _merged(self, t: Tensor, dim: int, n: int, rows: int) -> Optional[Tensor]:
        """t's expansion to ``rows`` = k * n leading rows: each example's copy repeated k times,
        for a batch merged with another axis, example-major (window attention's [N * W, ...],
        which the independence check verifies); made once per (t, dim, rows)."""
        rep = self._expansion(t, dim, n)
        if rep is None or rows == n:
            return rep
        done = self.expanded.get((id(t), dim, rows))
        if done is not None and done[0] is t:
            return done[1]
        with torch._C.DisableTorchFunction():
            k = rows // n
            out = rep.unsqueeze(1).expand(n, k, *rep.shape[1:]).reshape(rows, *rep.shape[1:])
        self.expanded[(id(t), dim, rows)] = (t, out)
        return out

    def _expansion(self, t: Tensor, dim: int, n: int) -> Optional[Tensor]:
        """t (an unbatched output or a view of one) as [n, ...] with ``dim`` dims, or None; made
        once per (t, dim)."""
        done = self.expanded.get((id(t), dim))
        if done is not None and done[0] is t:
            return done[1]
        entry = self.views.get(id(t))
        if entry is not None and entry[0] is t:
            rep = self._view_expansion(t, entry[1], entry[2], dim, n)
        else:
            rep = self._output_expansion(t, dim, n)
        if rep is not None:
            self.expanded[(id(t), dim)] = (t, rep)
        return rep

    def _output_expansion(self, t: Tensor, dim: int, n: int) -> Optional[Tensor]:
        """t viewed with ``dim`` dims and expanded to [n, ...] (t has a leading size of 1, or
        ``dim - 1`` dims)."""
        call, pad = self._call(t), dim - t.dim()
        if call is None or pad not in (0, 1) or (pad == 0 and t.shape[0] != 1):
            return None
        with torch._C.DisableTorchFunction():
            rep = t.reshape((1,) * pad + tuple(t.shape)).expand(n, *([-1] * (dim - 1)))
            x = call.args[0]
            _repoint(call, rep, x.reshape((1,) * pad + tuple(x.shape)).expand(
                n, *([-1] * (x.dim() + pad - 1))))
        del self.outputs[id(t)]
        return rep

    def _view_expansion(self, v: Tensor, t: Tensor, chain, dim: int, n: int) -> Optional[Tensor]:
        """v = chain(t): t gets a new leading example dim (once per t; the call must be
        position-wise, its input gets the dim too), the chain runs on each example's copy
        (``torch.vmap``), and v comes out as [n, ...] with ``dim`` dims (a leading 1 dropped)."""
        pad = dim - v.dim()
        if pad not in (0, 1) or (pad == 0 and v.shape[0] != 1):
            return None
        done = self.roots.get(id(t))
        if done is not None and done[0] is t:
            rep = done[1]
        else:
            call = self._call(t)
            if call is None or not call.position_wise:
                return None
            with torch._C.DisableTorchFunction():
                rep = t.unsqueeze(0).expand(n, *t.shape)
                x = call.args[0]
                _repoint(call, rep, x.unsqueeze(0).expand(n, *x.shape))
            del self.outputs[id(t)]
            self.roots[id(t)] = (t, rep)

        def views(u):
            for func, i, args, kwargs in chain:
                u = func(*args[:i], u, *args[i + 1:], **kwargs)
            return u
        with torch._C.DisableTorchFunction():
            out = torch.vmap(views)(rep)
        return out.squeeze(1) if pad == 0 else out

    def _call(self, t: Tensor):
        """The call of unbatched output t, if it can still be expanded (one output, not yet)."""
        entry = self.outputs.get(id(t))
        if entry is None or entry[1] is not t:
            return None
        call = entry[0]
        return call if call.origin is None and len(call.edges) == 1 else None


def _batched(size: int, n: int) -> bool:
    """Whether a leading dim of ``size`` may carry the batch of ``n``: n itself, or n merged
    with another axis."""
    return size > 0 and size % n == 0


def _repoint(call, rep: Tensor, x: Tensor) -> None:
    """Make ``call`` read its input as ``x`` and its output delta at ``rep`` (its old output
    edge kept as ``origin`` for the delta pass's check)."""
    call.args = (x,) + tuple(call.args[1:])
    call.origin = call.edges[0]
    call.edges = [get_gradient_edge(rep)]
