"""Rule for ``nn.Conv1d/2d/3d`` (stride, padding incl. 'same' and non-zero modes, dilation,
groups, optional bias).

With U_i the unfolded input patches of example i (``[C_in/g * K, L]`` per group, K kernel
taps, L output positions) and delta_i the output gradient (``[C_out/g, L]`` per group), the
per-example weight gradient is g_i = delta_i U_i^T, summed over the g groups' blocks:
    Gram form          sum_{l,l'} (U_i^T U_i)_{l l'} (delta_i^T delta_i)_{l l'}   ~ L^2 (C_in K + C_out)
    materialized form  ||delta_i U_i^T||_F^2                                    ~ L C_out C_in K / g
`use_gram` picks the cheaper per call; only the current layer is ever unfolded (Gram form). The
materialized form never unfolds: it is the weight gradient of one grouped convolution whose
groups are the N examples (times the layer's g groups); see `per_example_weight_grads`. The
bias gradient is sum_l delta_{i,:,l}.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import LayerRule, gram_sq_norm, row_sq_norms, sum_groups

_ConvNd = nn.modules.conv._ConvNd


# Measured time of one Gram-form flop relative to one materialized-form flop (a grouped
# convolution's weight gradient), per device type: the forms run on different kernels (batched
# matmuls vs grouped convolutions), whose speeds differ by device. Printed for the device it runs
# on by benchmarks/bench_conv_forms.py; a device type not listed counts flops alone (1.0).
GRAM_FLOP_COST = {"cpu": 1.3}  # 2-core CPU, oneDNN: median 1.34 over 10 layer shapes


def use_gram(positions: int, ck: int, c_out: int, groups: int, device_type: str = "cpu") -> bool:
    """True when the Gram form is expected to be faster than materializing per-example weights
    on ``device_type``: its flops, weighted by ``GRAM_FLOP_COST``, are fewer."""
    cost = GRAM_FLOP_COST.get(device_type, 1.0)
    return positions * (ck + c_out) * groups * cost < ck * c_out


def _explicit_padding(layer: _ConvNd) -> list:
    """Padding as an ``F.pad`` list (last dim first), resolving ``padding='same'``."""
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return [0, 0] * len(layer.kernel_size)
        pads = []
        for d, k in zip(reversed(layer.dilation), reversed(layer.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    return [p for p in reversed(layer.padding) for _ in range(2)]


def _pad(layer: _ConvNd, x: Tensor) -> Tensor:
    """``x`` with the layer's padding applied explicitly (any ``padding_mode``)."""
    pads = _explicit_padding(layer)
    if not any(pads):
        return x
    return F.pad(x, pads, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)


def unfold_patches(layer: _ConvNd, x: Tensor) -> Tensor:
    """Input patches ``[N, C_in * K, L]`` in the channel-major order of ``weight.flatten(1)``."""
    x = _pad(layer, x)
    nd = len(layer.kernel_size)
    if nd == 1:
        return F.unfold(x.unsqueeze(2), (1, *layer.kernel_size), dilation=(1, *layer.dilation),
                        stride=(1, *layer.stride))
    if nd == 2:
        return F.unfold(x, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
    # 3-D: im2col as a depthwise convolution with one-hot kernels.
    k = math.prod(layer.kernel_size)
    c = x.shape[1]
    eye = torch.eye(k, dtype=x.dtype, device=x.device).reshape(k, 1, *layer.kernel_size)
    cols = F.conv3d(x, eye.repeat(c, 1, 1, 1, 1), stride=layer.stride, dilation=layer.dilation,
                    groups=c)
    return cols.reshape(x.shape[0], c * k, -1)


# nd -> the weight gradient, the input gradient and the function of F.conv{nd}d
WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                3: torch.nn.grad.conv3d_weight}
INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,
               3: torch.nn.grad.conv3d_input}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _operands(layer: _ConvNd, x: Tensor):
    """``(x, padding)``: string padding and non-zero padding modes applied explicitly."""
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return _pad(layer, x), 0
    return x, layer.padding


def _batched_weight_grad(layer: _ConvNd, x: Tensor, d: Tensor, padding) -> Tensor:
    """``[N, C_out, C_in / g, *kernel]``: the weight gradient of one grouped convolution whose
    N*g groups are the examples (times the layer's groups)."""
    n, c_in, c_out, k = x.shape[0], x.shape[1], d.shape[1], tuple(layer.kernel_size)
    w = WEIGHT_GRAD[len(k)](x.reshape(1, n * c_in, *x.shape[2:]), (n * c_out, c_in // layer.groups, *k),
                             d.reshape(1, n * c_out, *d.shape[2:]), stride=layer.stride,
                             padding=padding, dilation=layer.dilation, groups=n * layer.groups)
    return w.reshape(n, c_out, c_in // layer.groups, *k)


def per_example_weight_grads(layer: _ConvNd, x: Tensor, grad_output: Tensor, group: int) -> Tensor:
    """``[N // group, C_out, C_in / g, *kernel]`` group sums of per-example weight gradients.

    The batch becomes a group dimension: the input viewed as one image of N*C_in channels and
    the output gradients as one of N*C_out channels are the operands of an ordinary grouped
    convolution's weight gradient with N*g groups, whose N*C_out kernels are the per-example
    gradients. No unfold, and autograd differentiates it with grouped convolutions too.
    """
    x, padding = _operands(layer, x)
    return _summed_weight_grads(layer, x, grad_output, padding, group)


def _summed_weight_grads(layer: _ConvNd, x: Tensor, d: Tensor, padding, group: int) -> Tensor:
    """``_batched_weight_grad`` summed over groups of ``group`` consecutive examples."""
    return sum_groups(_batched_weight_grad(layer, x, d, padding), group)


class _MaterializedSqNorm(torch.autograd.Function):
    """s_k = ||G_k||_F^2 with G_k = sum_{i in group k} delta_i (*) x_i the per-example weight
    gradients of `_batched_weight_grad`.

    Same value and derivatives as ``per_example_weight_grads(...).pow(2).sum()``, with less
    memory. G is bilinear in (x, delta), so with H = 2 s_bar G (one H_k per example of group k)
        d/d delta = conv(x, H)             (the layer's convolution with per-example kernels)
        d/d x     = conv_input(delta, H)   (its input gradient)
    G is held from forward to backward only, and H is formed in G's own storage, where autograd
    would hold G and allocate two more G-sized temporaries (pow's backward) at the peak of the
    step. A second backward through a retained graph recomputes G; under create_graph the
    backward is built from differentiable ops.
    """

    @staticmethod
    def forward(ctx, x, d, layer, padding, group):
        G = _summed_weight_grads(layer, x, d, padding, group)
        ctx.save_for_backward(x, d)
        ctx.layer, ctx.padding, ctx.group, ctx.G = layer, padding, group, G
        return row_sq_norms(G)  # one reduction, no G-sized temporary

    @staticmethod
    def backward(ctx, s_bar):
        x, d = ctx.saved_tensors
        layer, padding, group, G = ctx.layer, ctx.padding, ctx.group, ctx.G
        ctx.G = None
        scale = (2 * s_bar).reshape(-1, *[1] * x.dim())  # G: [G, C_out, C_in/g, *kernel]
        if torch.is_grad_enabled():  # create_graph: G as a function of (x, d)
            H = _summed_weight_grads(layer, x, d, padding, group) * scale
        else:
            if G is None:  # second backward through a retained graph
                G = _summed_weight_grads(layer, x, d, padding, group)
            H = G.mul_(scale)
        if group > 1:
            H = H.repeat_interleave(group, 0)
        n, c_in, c_out, nd = x.shape[0], x.shape[1], d.shape[1], x.dim() - 2
        H = H.reshape(n * c_out, *H.shape[2:])
        gx = gd = None
        if ctx.needs_input_grad[1]:
            gd = CONV[nd](x.reshape(1, n * c_in, *x.shape[2:]), H, stride=layer.stride, padding=padding,
                           dilation=layer.dilation, groups=n * layer.groups).reshape(d.shape)
        if ctx.needs_input_grad[0]:
            gx = INPUT_GRAD[nd]((1, n * c_in, *x.shape[2:]), H, d.reshape(1, n * c_out, *d.shape[2:]),
                                 stride=layer.stride, padding=padding, dilation=layer.dilation,
                                 groups=n * layer.groups).reshape(x.shape)
        return gx, gd, None, None, None


def _group_blocks(layer: _ConvNd, x: Tensor, grad_output: Tensor, group: int):
    """Patches ``[G, g, CK/g, m*L]`` and output grads ``[G, g, C_out/g, m*L]``."""
    g = layer.groups
    u = unfold_patches(layer, x)
    n, ck, length = u.shape
    d = grad_output.reshape(n, g, -1, length)
    u = u.reshape(n, g, ck // g, length)
    if group > 1:
        cout = d.shape[2]
        u = u.reshape(n // group, group, g, ck // g, length).permute(0, 2, 3, 1, 4)
        d = d.reshape(n // group, group, g, cout, length).permute(0, 2, 3, 1, 4)
        u = u.reshape(n // group, g, ck // g, group * length)
        d = d.reshape(n // group, g, cout, group * length)
    return u, d


def conv_sq_norms(layer: _ConvNd, inputs: Sequence, grad_output: Tensor,
                  names: Sequence[str], group: int) -> Tensor:
    out = grad_output.new_zeros(grad_output.shape[0] // group)
    if "bias" in names:
        b = grad_output.flatten(2).sum(2)  # [N, C_out]
        out = out + sum_groups(b, group).pow(2).sum(1)
    if "weight" not in names:
        return out
    x = inputs[0]
    ck = layer.weight[0].numel() * layer.groups
    length = grad_output[0, 0].numel() * group
    if not use_gram(length, ck, grad_output.shape[1], layer.groups, grad_output.device.type):
        x, padding = _operands(layer, x)
        return out + _MaterializedSqNorm.apply(x, grad_output, layer, padding, group)
    u, d = _group_blocks(layer, x, grad_output, group)
    G, g, ck, length = u.shape
    u = u.transpose(2, 3).reshape(G * g, length, ck)
    d = d.transpose(2, 3).reshape(G * g, length, d.shape[2])
    return out + gram_sq_norm(u, d).reshape(G, g).sum(1)


def conv_grads(layer: _ConvNd, inputs: Sequence, grad_output: Tensor,
               names: Sequence[str], group: int) -> Dict[str, Tensor]:
    grads = {}
    if "weight" in names:
        grads["weight"] = per_example_weight_grads(layer, inputs[0], grad_output, group)
    if "bias" in names:
        b = grad_output.flatten(2).sum(2)
        grads["bias"] = sum_groups(b, group)
    return grads


CONV_RULE = LayerRule(grads=conv_grads, sq_norms=conv_sq_norms)
