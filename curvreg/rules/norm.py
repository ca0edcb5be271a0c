"""Rules for the affine parameters of per-example normalization layers.

For y = xhat * w + b (w, b broadcast over positions), example i's gradients are
    g_i(w) = sum_{positions} delta_i * xhat_i,    g_i(b) = sum_{positions} delta_i,
which are as small as the parameters, so they are materialized. xhat is recomputed from the
recorded input with the layer's own statistics. Covers ``LayerNorm``, ``GroupNorm``,
``InstanceNorm*d`` and ``BatchNorm*d`` in eval mode with running statistics, and the affine step of a training-mode
BatchNorm under ``GradNormTape(batch_norm=...)`` (``curvreg.batchnorm``), whose recorded input is
the normalized ``xhat`` itself.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ._base import LayerRule, sum_groups


def _affine_grads(xhat: Tensor, grad_output: Tensor, names: Sequence[str], group: int,
                  reduce_dims: tuple, shape: tuple) -> Dict[str, Tensor]:
    n = grad_output.shape[0]
    reduce = (lambda t: t.sum(reduce_dims)) if reduce_dims else (lambda t: t)
    grads = {}
    if "weight" in names:
        grads["weight"] = reduce(grad_output * xhat).reshape(n, *shape)
    if "bias" in names:
        grads["bias"] = reduce(grad_output).reshape(n, *shape)
    return {k: sum_groups(v, group) for k, v in grads.items()}


def layer_norm_grads(layer: nn.LayerNorm, inputs, grad_output, names, group):
    x = inputs[0]
    xhat = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
    lead = tuple(range(1, x.dim() - len(layer.normalized_shape)))
    return _affine_grads(xhat, grad_output, names, group, lead, tuple(layer.normalized_shape))


def group_norm_grads(layer: nn.GroupNorm, inputs, grad_output, names, group):
    x = inputs[0]
    xhat = F.group_norm(x, layer.num_groups, eps=layer.eps)
    return _affine_grads(xhat, grad_output, names, group, tuple(range(2, x.dim())),
                         (layer.num_channels,))


def batch_norm_eval_grads(layer: nn.modules.batchnorm._NormBase, inputs, grad_output, names, group):
    x = inputs[0]
    if getattr(layer, "rows", False) and x.dim() == 3:  # [R, C] rows read as [N, k, C]
        x, grad_output = x.transpose(1, 2), grad_output.transpose(1, 2)
    use_batch_stats = layer.training or layer.running_mean is None
    if use_batch_stats and isinstance(layer, nn.modules.batchnorm._BatchNorm):
        raise ValueError("BatchNorm with batch statistics mixes examples")
    if use_batch_stats:  # InstanceNorm: statistics of each example and channel
        xhat = F.instance_norm(x, eps=layer.eps)
    else:
        xhat = F.batch_norm(x, layer.running_mean, layer.running_var, training=False, eps=layer.eps)
    return _affine_grads(xhat, grad_output, names, group, tuple(range(2, x.dim())),
                         (layer.num_features,))


LAYER_NORM_RULE = LayerRule(grads=layer_norm_grads)
GROUP_NORM_RULE = LayerRule(grads=group_norm_grads)
BATCH_NORM_EVAL_RULE = LayerRule(grads=batch_norm_eval_grads)


def rms_norm_grads(layer: nn.RMSNorm, inputs, grad_output, names, group):
    x = inputs[0]
    xhat = F.rms_norm(x, layer.normalized_shape, eps=layer.eps)
    lead = tuple(range(1, x.dim() - len(layer.normalized_shape)))
    return _affine_grads(xhat, grad_output, names, group, lead, tuple(layer.normalized_shape))


RMS_NORM_RULE = LayerRule(grads=rms_norm_grads)


def normalized_affine_grads(layer, inputs, grad_output, names, group):
    xhat = inputs[0]
    return _affine_grads(xhat, grad_output, names, group, tuple(range(2, xhat.dim())),
                         (xhat.shape[1],))


NORMALIZED_AFFINE_RULE = LayerRule(grads=normalized_affine_grads)
