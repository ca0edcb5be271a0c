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

*Functions of parameters alone* go further than views: an op whose inputs are parameters,
such functions, unbatched rule-op outputs and constants (tensors that need no gradient), and no
rule covers (Swin-V2's continuous position bias: an MLP on a fixed coordinate table, indexed,
``16 * sigmoid``; a logit scale ``clamp(p).exp()``), gives a function P of parameters alone
(``chain``). Where P meets the batch it is expanded the same way, and a ``ParamFunction`` call is
recorded there, whose rule takes each example's gradient of P's parameters as a
vector-Jacobian product. Whether that path is taken is settled after the forward
(``Recording.settle_chains``): only if every such tensor went into such ops or into a meeting
(``spoiled`` otherwise) and the parameters have no other use the per-example loop would take;
else the forward's ordinary record stands (the ops were recorded as usual too).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten

from . import ops

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

    def __init__(self, params: Optional[Dict[int, tuple]] = None):
        self.params = params or {}  # id -> (name, Parameter) of the model's trainable ones
        self.outputs: Dict[int, tuple] = {}    # id(t) -> (its call, t), until expanded
        self.views: Dict[int, tuple] = {}      # id(v) -> (v, the output t, ops from t to v)
        self.roots: Dict[int, tuple] = {}      # id(t) -> (t, [n, *t.shape]) for views of t
        self.expanded: Dict[tuple, tuple] = {}  # (id(v), dims) -> (v, its expansion)
        # functions of parameters alone: id(P) -> (P, {id(p): p} of its parameters)
        self.parametric: Dict[int, tuple] = {}
        self.absorbed: Dict[int, object] = {}  # id(call) -> rule call made inside such a function
        self.meetings: list = []   # the ParamFunction calls made where a function met the batch
        self.spoiled: set = set()  # ids of parameters of a function used by another op
        self.meet = None  # set by the recording: (P, expansion, params) -> the recorded call

    def __bool__(self) -> bool:
        return bool(self.outputs or self.views or self.parametric)

    def chain(self, args, kwargs, used: list, covered: Callable[[], bool], view_op: bool,
              out) -> bool:
        """Record ``out`` as a function of parameters alone, if this op's tensor inputs are
        parameters (``used``), such functions, unbatched rule-op outputs (or views of them) and
        constants, and it is not an op the other mechanisms take (a rule op on parameters and
        constants alone, ``covered()``; a view op on an unbatched output, followed instead). An op
        that meets such a function with data spoils it. Whether it was recorded."""
        params: Dict[int, Tensor] = {}
        roots, functions, data = [], False, False
        for t in tree_flatten((args, kwargs))[0]:
            if not isinstance(t, Tensor):
                continue
            if any(t is p for p in used):
                params[id(t)] = t
            elif (entry := self.parametric.get(id(t))) is not None and entry[0] is t:
                params.update(entry[1])
                functions = True
            elif (call := self._root_call(t)) is not None:
                roots.append(call)
            elif t.requires_grad:
                data = True
        if data or not (params or roots):
            self.spoiled.update(params if functions else ())
            self.spoiled.update(k for c in roots for k in c.keys)
            return False
        if not functions and (view_op if roots else covered()):
            return False
        for c in roots:
            params.update((k, self.params[k][1]) for k in c.keys)
            self.absorbed[id(c)] = c
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.requires_grad]
        for t in outs:
            self.parametric[id(t)] = (t, params)
        return bool(outs)

    def _root_call(self, t: Tensor):
        """The call of unbatched output t, or of the output t is a view of, if unexpanded and
        its data input a constant (an output without the batch's leading dim may also be one
        whose batch is merged with another axis: window attention's [N * W, ...])."""
        entry = self.outputs.get(id(t))
        if entry is not None and entry[1] is t:
            call = self._call(t)
        elif (entry := self.views.get(id(t))) is not None and entry[0] is t:
            call = self._call(entry[1])
        else:
            return None
        if call is None or any(isinstance(a, Tensor) and a.requires_grad for a in call.args):
            return None
        return call

    def linear_bias(self, args, kwargs):
        """For ``F.linear(x, W, b)`` with b a function of parameters alone (torchvision
        Swin-V2's q, k, v bias, cloned with its key part zeroed), the same computation as
        ``F.linear(x, W) + b`` (to run under the tape's op mode, where the sum meets the batch),
        else None."""
        x, w, b = ops.linear_args(args, kwargs)
        if not self.holds((b,)) or not isinstance(x, Tensor):
            return None
        return lambda: F.linear(x, w) + b

    def holds(self, args) -> bool:
        """Whether any of an op's arguments is a function of parameters alone."""
        return any(isinstance(t, Tensor) and (e := self.parametric.get(id(t))) is not None
                   and e[0] is t for t in args)

    def spoil(self, tensors) -> None:
        """Such functions (and unbatched outputs) among ``tensors`` are used elsewhere (the
        model's outputs)."""
        for t in tensors:
            if not isinstance(t, Tensor):
                continue
            entry = self.parametric.get(id(t))
            if entry is not None and entry[0] is t:
                self.spoiled.update(entry[1])
            call = self._root_call(t)
            if call is not None:
                self.spoiled.update(call.keys)

    def add(self, call, out: Tensor) -> None:
        """``out``, the output of rule call ``call``, has no example dimension."""
        self.outputs[id(out)] = (call, out)

    def broadcast(self, args, n: int, matmul: bool = False):
        """``args`` of a broadcasting op, an unbatched operand meeting a batched one replaced by
        its expansion: ``x + pos`` with pos [1, T, d] or [T, d] and x [N, T, d]; with ``matmul``,
        of a batched product (both operands matrices or stacks of them, the batched one with
        leading dims)."""
        a, b = args
        for i, (t, other) in enumerate(((a, b), (b, a))):
            if matmul and not (isinstance(t, Tensor) and isinstance(other, Tensor)
                               and t.dim() >= 2 and other.dim() >= 3):
                continue
            if (isinstance(t, Tensor) and isinstance(other, Tensor) and other.dim() >= t.dim()
                    and other.dim() > 0 and _batched(other.shape[0], n)):
                rep = self._merged(t, other.dim(), n, other.shape[0])
                if rep is not None:
                    return (rep, b) if i == 0 else (a, rep)
        return args

    def einsum(self, args, kwargs, n: int):
        """``args`` of a two-operand ``torch.einsum`` in which an unbatched operand meets a
        batched one, the first rewritten to take the second's leading index and replaced by its
        expansion (MViTv2's ``einsum("byhwc,hkc->byhwk", q, table[dist])``); unchanged
        otherwise."""
        if kwargs or len(args) != 3 or not isinstance(args[0], str) or "." in args[0]:
            return args
        eq, a, b = args
        inputs, arrow, output = eq.replace(" ", "").partition("->")
        subs = inputs.split(",")
        if not arrow or len(subs) != 2:
            return args
        for i, (t, other) in enumerate(((a, b), (b, a))):
            mine, theirs = subs[i], subs[1 - i]
            if not (isinstance(t, Tensor) and isinstance(other, Tensor) and other.dim() > 0
                    and _batched(other.shape[0], n) and len(mine) == t.dim()
                    and len(theirs) == other.dim() and theirs[0] not in mine
                    and theirs.count(theirs[0]) == 1):
                continue
            rep = self._merged(t, t.dim() + 1, n, other.shape[0])
            if rep is None:
                continue
            new = [theirs[0] + mine, theirs] if i == 0 else [theirs, theirs[0] + mine]
            operands = (rep, b) if i == 0 else (a, rep)
            return (",".join(new) + "->" + output,) + operands
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
        if not all(keep(s, k) for s, k in zip(sizes[1:], rest[1:])):
            return None
        if rest[0] == 1:
            return self._expansion(t, len(sizes), n)
        if func is not Tensor.repeat or pad:
            return None
        # t [h, ...].repeat(n, 1, ...): n copies of t, the batch merged with t's leading dim,
        # example-major (DeBERTa's relative position projections, [h, 2k, d] against the
        # queries' [N * h, T, d])
        rep = self._expansion(t, t.dim() + 1, n)
        if rep is None:
            return None
        with torch._C.DisableTorchFunction():
            return rep.reshape(n * t.shape[0], *t.shape[1:])

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
        function = self.parametric.get(id(t))
        if entry is not None and entry[0] is t:
            rep = self._view_expansion(t, entry[1], entry[2], dim, n)
        elif function is not None and function[0] is t:
            rep = self._function_expansion(t, function[1], dim, n)
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
            rep = _to_batch(t, pad, n)
            # p.expand(T, ...) has no input: the shift's rule reads the delta alone
            _repoint(call, rep, _to_batch(call.args[0], pad, n) if call.args else None)
        del self.outputs[id(t)]
        return rep

    def _function_expansion(self, t: Tensor, params: dict, dim: int, n: int) -> Optional[Tensor]:
        """Function of parameters t as [n, ...] with ``dim`` dims (t has a leading size of 1, or
        fewer dims: a bias [d] against [N, T, d]), with its ``ParamFunction`` call recorded at the
        expansion."""
        pad = dim - t.dim()
        if pad < 0 or (pad == 0 and t.shape[0] != 1):
            return None
        with torch._C.DisableTorchFunction():
            rep = _to_batch(t, pad, n)
            self.meetings.append(self.meet(t, rep, list(params.values())))
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
                rep = _to_batch(t, 1, n)
                _repoint(call, rep, _to_batch(call.args[0], 1, n))
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


def _to_batch(t: Tensor, pad: int, n: int) -> Tensor:
    """t with ``pad`` leading dims of 1 added, the first of them (or t's own leading 1, for
    ``pad`` 0) expanded to ``n``: the same values for every example."""
    return t.reshape((1,) * pad + tuple(t.shape)).expand(n, *([-1] * (t.dim() + pad - 1)))


def _batched(size: int, n: int) -> bool:
    """Whether a leading dim of ``size`` may carry the batch of ``n``: n itself, or n merged
    with another axis."""
    return size > 0 and size % n == 0


def _repoint(call, rep: Tensor, x: Optional[Tensor]) -> None:
    """Make ``call`` read its input as ``x`` (None: it has none) and its output delta at ``rep``
    (its old output edge kept as ``origin`` for the delta pass's check)."""
    if x is not None:
        call.args = (x,) + tuple(call.args[1:])
    call.origin = call.edges[0]
    call.edges = [get_gradient_edge(rep)]
