"""One weight-gradient product for the two paths of a taped dense layer.

For y = x W^T + b on a 2-D input, the penalty's backward reaches W along two paths:
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
the loss through the whole delta chain.

Only the tape's forward uses this (``_UsageMode`` routes ``F.linear`` on 2-D inputs with a
trainable weight here). With ``create_graph=True`` in the outer backward, both nodes fall back to
the ordinary differentiable formulas, so higher derivatives stay exact.
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
        self.stash: List[tuple] = []  # (graph task id, delta [N, d_out], u [N, d_in])


def _task() -> int:
    return torch._C._current_graph_task_id()


class TapedLinear(torch.autograd.Function):
    """y = F.linear(x, w, b), whose backward fuses the stashed delta-chain factors into dW."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Optional[Tensor], holder: Holder) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.holder = holder
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        holder: Holder = ctx.holder
        if holder.delta_pass:  # the tape's dL/dy pass asks for input gradients only
            gx = None
            if need_x:
                gx = LinearInputGrad.apply(gy, w, holder) if torch.is_grad_enabled() else gy.mm(w)
            return gx, None, None, None
        gx = gy.mm(w) if need_x else None
        gb = gy.sum(0) if need_b else None
        gw = None
        if need_w:
            task = _task()
            mine = [s for s in holder.stash if s[0] == task]
            gw = gy.t().mm(x)
            if mine and not torch.is_grad_enabled():
                holder.stash = [s for s in holder.stash if s[0] != task]
                for _, d, u in mine:
                    gw.addmm_(d.t(), u)  # accumulate in place: no second weight-sized buffer
        return gx, gw, gb, None


class LinearInputGrad(torch.autograd.Function):
    """dL/dx = delta W (differentiable); its backward stashes (delta, u) for ``TapedLinear``."""

    @staticmethod
    def forward(ctx, delta: Tensor, w: Tensor, holder: Holder) -> Tensor:
        ctx.save_for_backward(delta, w)
        ctx.holder = holder
        return delta.mm(w)

    @staticmethod
    def backward(ctx, u: Tensor):
        delta, w = ctx.saved_tensors
        need_delta, need_w, _ = ctx.needs_input_grad
        g_delta = u.mm(w.t()) if need_delta else None
        g_w = None
        if need_w:
            if torch.is_grad_enabled():  # create_graph: keep the plain differentiable product
                g_w = delta.t().mm(u)
            else:
                ctx.holder.stash.append((_task(), delta, u))
        return g_delta, g_w, None


def can_fuse(args, kwargs, params, policy="auto") -> bool:
    """True for ``F.linear(x, w[, b])`` on a 2-D float input with a trainable weight of ``params``.

    ``policy``: ``True`` fuses every such call, ``False`` none, and ``"auto"`` only those where
    the weight-sized temporary that fusing saves is more than twice the stashed factors it keeps:
    d_in d_out > 2N (d_in + d_out). That holds for the 4096-wide MLP at batch 256 and not for the
    512-wide one, where a first (concatenating) version of fusing measured slower and no smaller.
    """
    if policy is False:
        return False
    if kwargs or len(args) not in (2, 3):
        return False
    x, w = args[0], args[1]
    b = args[2] if len(args) == 3 else None
    if type(x) is not Tensor and not isinstance(x, torch.nn.Parameter):
        return False
    if not isinstance(w, torch.nn.Parameter) or id(w) not in params or x.dim() != 2:
        return False
    if not (torch.is_grad_enabled() and x.dtype == w.dtype and x.device == w.device
            and w.dim() == 2 and x.is_floating_point()):
        return False
    if b is not None and (not isinstance(b, Tensor) or b.dtype != w.dtype):
        return False
    if policy == "auto" and w.numel() <= 2 * x.shape[0] * (w.shape[0] + w.shape[1]):
        return False
    return not torch.is_autocast_enabled(x.device.type)
