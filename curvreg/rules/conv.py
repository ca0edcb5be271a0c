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

from ._base import LayerRule, gram_sq_norm

_ConvNd = nn.modules.conv._ConvNd


def use_gram(positions: int, ck: int, c_out: int, groups: int) -> bool:
    """True when the Gram form costs fewer flops than materializing per-example weights."""
    return positions * (ck + c_out) * groups < ck * c_out


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


_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                3: torch.nn.grad.conv3d_weight}


def per_example_weight_grads(layer: _ConvNd, x: Tensor, grad_output: Tensor, group: int) -> Tensor:
    """``[N // group, C_out, C_in / g, *kernel]`` group sums of per-example weight gradients.

    The batch becomes a group dimension: the input viewed as one image of N*C_in channels and
    the output gradients as one of N*C_out channels are the operands of an ordinary grouped
    convolution's weight gradient with N*g groups, whose N*C_out kernels are the per-example
    gradients. No unfold, and autograd differentiates it with grouped convolutions too.
    """
    padding = layer.padding
    if isinstance(padding, str) or layer.padding_mode != "zeros":
        x, padding = _pad(layer, x), 0
    n, c_in, g = x.shape[0], x.shape[1], layer.groups
    c_out, k = grad_output.shape[1], tuple(layer.kernel_size)
    w = _WEIGHT_GRAD[len(k)](x.reshape(1, n * c_in, *x.shape[2:]), (n * c_out, c_in // g, *k),
                             grad_output.reshape(1, n * c_out, *grad_output.shape[2:]),
                             stride=layer.stride, padding=padding, dilation=layer.dilation,
                             groups=n * g)
    w = w.reshape(n, c_out, c_in // g, *k)
    return w if group == 1 else w.reshape(n // group, group, *w.shape[1:]).sum(1)


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
        out = out + (b if group == 1 else b.reshape(-1, group, b.shape[1]).sum(1)).pow(2).sum(1)
    if "weight" not in names:
        return out
    x = inputs[0]
    ck = layer.weight[0].numel() * layer.groups
    length = grad_output[0, 0].numel() * group
    if not use_gram(length, ck, grad_output.shape[1], layer.groups):
        w = per_example_weight_grads(layer, x, grad_output, group)
        return out + w.pow(2).flatten(1).sum(1)
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
        grads["bias"] = b if group == 1 else b.reshape(-1, group, b.shape[1]).sum(1)
    return grads


CONV_RULE = LayerRule(grads=conv_grads, sq_norms=conv_sq_norms)
