"""Convolutions inside the tape, with a backward built from first-order convolutions.

The tape's delta pass takes the input gradient of every layer with ``create_graph=True``, and
the training backward then differentiates it. For a convolution PyTorch records that input
gradient as a ``ConvolutionBackward`` node, whose own derivative (``_convolution_double_backward``)
computes the weight term one group at a time: a depthwise 7x7 convolution with 384 channels
becomes 384 small convolutions per call (ConvNeXt spent a quarter of its regularized step there
on the CPU). Here the forward is the same ``F.conv{1,2,3}d``; the backward writes the input
gradient as ``F.conv_transpose{1,2,3}d`` of the output gradient, an ordinary differentiable op
whose derivatives are single (grouped) convolutions. The weight gradient is
``torch.nn.grad.conv*_weight``, skipped during the delta pass (which asks for input gradients
only). Ungrouped convolutions gain too (about 10% of a regularized ResNet-20 or all-conv step on
the CPU: the transposed convolution's first-order backward is cheaper than the generic double
backward). Only the tape routes convolutions here (a trainable weight, numeric padding, no
autocast); the values and every derivative are those of the plain convolution.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import CONV_DIMS, conv_call
from .rules.conv import CONV, WEIGHT_GRAD

_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_args(func, args, kwargs):
    """``(nd, x, w, b, stride, padding, dilation, groups)`` of a convolution call that this
    module takes (numeric padding, a batched input, no autocast), else None."""
    nd = CONV_DIMS.get(func)
    if nd is None:
        return None
    c = conv_call(nd, args, kwargs)
    if (not isinstance(c.groups, int) or isinstance(c.padding, str)
            or not isinstance(c.x, Tensor) or not isinstance(c.weight, Tensor) or c.x.dim() != nd + 2
            or torch.is_autocast_enabled(c.x.device.type)):  # autocast: PyTorch's own convolution
        return None
    return c


class TapedConv(torch.autograd.Function):
    """y = F.conv{nd}d(x, w, b, ...), whose input gradient is a transposed convolution."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Optional[Tensor], nd: int, stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], groups: int, switch) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.conf = (nd, stride, padding, dilation, groups)
        ctx.switch = switch
        return CONV[nd](x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w = ctx.saved_tensors
        nd, stride, padding, dilation, groups = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        if need_x:
            k = w.shape[2:]
            out_pad = [x.shape[2 + i] - ((gy.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                         + dilation[i] * (k[i] - 1) + 1) for i in range(nd)]
            gx = _TRANSPOSE[nd](gy, w, None, stride, padding, out_pad, groups, dilation)
        if not ctx.switch.frozen:  # the delta pass needs input gradients only
            if need_w:
                gw = WEIGHT_GRAD[nd](x, w.shape, gy, stride, padding, dilation, groups)
            if need_b:
                gb = gy.sum([0] + list(range(2, gy.dim())))
        return gx, gw, gb, None, None, None, None, None, None
