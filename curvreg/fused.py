"""One weight-gradient product for the two paths of a taped dense layer.

For y = x W^T + b (rows x of any leading shape), the penalty's backward reaches W along two paths:
    the forward path        dJ/dW  = gy^T x            gy = dJ/dy   (loss and penalty)
    the delta chain         dJ/dW += delta^T u         u  = dJ/d(delta W), where delta W = dL/dx
Plain autograd forms both [d_out, d_in] products and adds them. Worse, it forms every layer's
delta-chain product first (the chain is differentiated from the input layer up) and holds them
all until the primal backward comes down to each layer: a model's worth of weight-sized
temporaries. Here the delta-chain node stashes its two thin factors (delta, u) instead, and the
layer's own backward forms
    dJ/dW = gy^T x + delta^T u
in one weight-sized buffer, accumulating the second product into the first in place. The stash
is always filled first: the layer's backward waits for the gradient of y, which flows back from
the loss through the whole delta chain. A weight stored transposed, [d_in, d_out], as in
``torch.addmm(b, x, W)`` (GPT-2's Conv1D), takes the same path with the products transposed.

Only the tape's forward uses this (``_UsageMode`` routes ``F.linear`` and ``torch.addmm`` calls
with a trainable weight here, ``fusable``). With ``create_graph=True`` in the outer backward,
both nodes fall back to the ordinary differentiable formulas, so higher derivatives stay exact.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class Holder:
    """Per layer call: whether the tape's delta pass is running, and the stashed factors."""

    __slots__ = ("delta_pass", "stash")

    def __init__(self):
        self.delta_pass = False
        self.stash: List[tuple] = []  # (graph task id, delta [rows, d_out], u [rows, d_in])


def _task() -> int:
    return torch._C._current_graph_task_id()


class TapedLinear(torch.autograd.Function):
    """y = F.linear(x, w, b), or with ``transposed`` y = torch.addmm(b, x, w) (w stored
    [d_in, d_out]), whose backward fuses the stashed delta-chain factors into dW."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Optional[Tensor], holder: Holder,
                transposed: bool) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.holder, ctx.transposed = holder, transposed
        return torch.addmm(b, x, w) if transposed else F.linear(x, w, b)

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        holder: Holder = ctx.holder
        transposed = ctx.transposed
        if holder.delta_pass:  # the tape's dL/dy pass asks for input gradients only
            gx = None
            if need_x:
                gx = (LinearInputGrad.apply(gy, w, holder, transposed) if torch.is_grad_enabled()
                      else _input_grad(gy, w, transposed))
            return gx, None, None, None, None
        gx = _input_grad(gy, w, transposed) if need_x else None
        gy2 = _rows(gy) if need_w or need_b else None
        gb = gy2.sum(0) if need_b else None
        gw = None
        if need_w:
            task = _task()
            mine = [s for s in holder.stash if s[0] == task]
            gw = _weight_grad(gy2, _rows(x), transposed)
            if mine and not torch.is_grad_enabled():
                holder.stash = [s for s in holder.stash if s[0] != task]
                for _, d, u in mine:  # accumulate in place: no second weight-sized buffer
                    _weight_grad(d, u, transposed, into=gw)
        return gx, gw, gb, None, None


class LinearInputGrad(torch.autograd.Function):
    """dL/dx = delta W (delta W^T for a transposed w; differentiable); its backward stashes
    (delta, u) as rows for ``TapedLinear``."""

    @staticmethod
    def forward(ctx, delta: Tensor, w: Tensor, holder: Holder, transposed: bool) -> Tensor:
        ctx.save_for_backward(delta, w)
        ctx.holder, ctx.transposed = holder, transposed
        return _input_grad(delta, w, transposed)

    @staticmethod
    def backward(ctx, u: Tensor):
        delta, w = ctx.saved_tensors
        need_delta, need_w = ctx.needs_input_grad[:2]
        transposed = ctx.transposed
        g_delta = u.matmul(w if transposed else w.t()) if need_delta else None
        g_w = None
        if need_w:
            d2, u2 = _rows(delta), _rows(u)
            if torch.is_grad_enabled():  # create_graph: keep the plain differentiable product
                g_w = _weight_grad(d2, u2, transposed)
            else:
                ctx.holder.stash.append((_task(), d2, u2))
        return g_delta, g_w, None, None


def _input_grad(delta: Tensor, w: Tensor, transposed: bool) -> Tensor:
    """delta [..., d_out] times W [d_out, d_in], or times W^T for W stored [d_in, d_out]."""
    return delta.matmul(w.t() if transposed else w)


def _weight_grad(d: Tensor, u: Tensor, transposed: bool, into: Optional[Tensor] = None) -> Tensor:
    """The weight gradient sum_rows d^T u ([d_out, d_in]) of rows d [R, d_out], u [R, d_in], or
    its transpose for a weight stored [d_in, d_out]; accumulated into ``into`` in place if given."""
    a, b = (u, d) if transposed else (d, u)
    return a.t().mm(b) if into is None else into.addmm_(a.t(), b)


def _rows(t: Tensor) -> Tensor:
    """``t`` as a matrix of rows [*, last dim]."""
    return t.reshape(-1, t.shape[-1])


def fusable(func, args, kwargs, params, policy="auto") -> Optional[tuple]:
    """``(x, w, b, transposed)`` for a call to fuse, else None: ``F.linear(x, w[, b])`` on a
    float input of two or more dims, or ``torch.addmm(b, x, w)`` (b of shape [d_out], no beta or
    alpha), with a trainable weight of ``params``.

    ``policy``: ``True`` fuses every such call, ``False`` none, and ``"auto"`` only those where
    the weight-sized temporary that fusing saves is more than twice the stashed factors it keeps:
    d_in d_out > 2R (d_in + d_out) for R rows (examples times positions). That holds for the
    4096-wide MLP at batch 256 and not for the 512-wide one, where a first (concatenating)
    version of fusing measured slower and no smaller.
    """
    if policy is False or kwargs:
        return None
    if func is F.linear and len(args) in (2, 3):
        x, w = args[0], args[1]
        b = args[2] if len(args) == 3 else None
        transposed = False
    elif func is torch.addmm and len(args) == 3:
        b, x, w = args
        transposed = True
        if not (isinstance(b, Tensor) and isinstance(w, Tensor) and w.dim() == 2
                and b.shape == w.shape[1:] and isinstance(x, Tensor) and x.dim() == 2):
            return None
    else:
        return None
    if type(x) is not Tensor and not isinstance(x, torch.nn.Parameter):
        return None
    if not isinstance(w, torch.nn.Parameter) or id(w) not in params or x.dim() < 2:
        return None
    if not (torch.is_grad_enabled() and x.dtype == w.dtype and x.device == w.device
            and w.dim() == 2 and x.is_floating_point()):
        return None
    if b is not None and (not isinstance(b, Tensor) or b.dtype != w.dtype):
        return None
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if policy == "auto" and w.numel() <= 2 * rows * (w.shape[0] + w.shape[1]):
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    return x, w, b, transposed
