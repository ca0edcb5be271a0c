"""Rule for weight-standardized convolutions: timm's ``StdConv2d`` (BiT ResNet-V2) and
``ScaledStdConv2d`` (NF-nets), and Hugging Face's ``WeightStandardizedConv2d`` (BiT, ViT
hybrid), which convolve with a weight standardized per output channel.

Per output channel c, with v = V_c (n = C_in/g * K entries), mu its mean, s^2 its (biased)
variance, r = (s^2 + eps)^-1/2, w_hat = (v - mu) r and the applied weight W_c = gamma_c w_hat
(gamma = gain * scale for ScaledStdConv2d, 1 for StdConv2d). With G_c = d l / d W_c (the
ordinary convolution weight gradient of one example or group),
    d l / d V_c    = gamma_c r (G_c - mean(G_c) - w_hat mean(G_c * w_hat))
    d l / d gain_c = scale <G_c, w_hat>
and, because w_hat has mean 0 and ||w_hat||^2 = n kappa with kappa = s^2 r^2,
    ||d l / d V_c||^2 = (gamma_c r)^2 (||G_c||^2 - S1_c^2 / n - (2 - kappa) S2_c^2 / n),
    S1_c = <G_c, 1> = sum_l delta_{c,l} (sum of patch l's entries),  S2_c = <G_c, w_hat> = sum_l delta_{c,l} z_{c,l}
with z = conv(x, w_hat). sum_c (gamma_c r)^2 ||G_c||^2 is the convolution rule's norm with delta's
channels scaled by gamma_c r, so nothing per-example is materialized. Every step is a
differentiable op of (x, delta, V, gain), so double backprop is exact.

The rule is keyed by these exact classes (found by module and name, without importing timm or
transformers), and checks once per module that the module's forward is the convolution it models.
"""
from __future__ import annotations

import weakref
from typing import Dict, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from ._base import LayerRule, sum_groups
from .conv import CONV, _operands, conv_sq_norms, per_example_weight_grads


class Layout(NamedTuple):
    """How a weight-standardized convolution class differs from ``nn.Conv2d``."""
    gain: bool  # a ``gain`` parameter (and a ``scale``): the weight is gain * scale * w_hat
    pad: bool   # a ``pad`` attribute: a padding module (or None) run on the input first


# (module, class name) -> its layout
CLASSES = {("timm.layers.std_conv", "StdConv2d"): Layout(gain=False, pad=False),
           ("timm.layers.std_conv", "ScaledStdConv2d"): Layout(gain=True, pad=False),
           ("transformers.models.bit.modeling_bit", "WeightStandardizedConv2d"):
               Layout(gain=False, pad=True)}

_VERIFIED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _key(module: nn.Module) -> tuple:
    return type(module).__module__, type(module).__name__


def is_std_conv(module: nn.Module) -> bool:
    """Whether ``module`` is one of the weight-standardized convolution classes (``CLASSES``)."""
    return _key(module) in CLASSES


def rules_for(model: nn.Module) -> Dict[type, LayerRule]:
    """``{type: rule}`` for the weight-standardized convolution classes used in ``model``."""
    return {type(m): STD_CONV_RULE for m in model.modules() if is_std_conv(m)}


def _standardized(layer: nn.Module):
    """(w_hat ``[C, n]``, gamma ``[C]``, r ``[C]``, kappa ``[C]``) from the layer's weight."""
    v = layer.weight.flatten(1)
    mu = v.mean(1, keepdim=True)
    var = (v - mu).pow(2).mean(1)
    r = (var + layer.eps).rsqrt()
    w_hat = (v - mu) * r[:, None]
    gamma = (layer.gain.flatten() * layer.scale) if CLASSES[_key(layer)].gain else torch.ones_like(r)
    return w_hat, gamma, r, var * r * r


def _padded(layer: nn.Module, x: Tensor) -> Tensor:
    """The input the convolution itself sees: x through the layer's padding module, if any."""
    pad = getattr(layer, "pad", None) if CLASSES[_key(layer)].pad else None
    return x if pad is None else pad(x)


def _check_forward(layer: nn.Module, x: Tensor, w_hat: Tensor, gamma: Tensor) -> None:
    """Once per module: its forward on the module's input ``x`` equals conv(x, gamma w_hat) + b
    (else a changed class)."""
    if layer in _VERIFIED:
        return
    with torch.no_grad(), torch._C.DisableTorchFunction():
        got = type(layer).forward(layer, x)
        want = _conv(layer, _padded(layer, x), (w_hat * gamma[:, None]).reshape_as(layer.weight),
                     layer.bias)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max().clamp_min(1e-30))):
        raise ValueError(
            f"{type(layer).__name__}'s forward is not the weight-standardized convolution "
            "curvreg's rule models (per-channel mean and biased variance, eps, gain * scale); "
            "pass GradNormTape(rules={type(layer): ...}) with a rule for it")
    _VERIFIED.add(layer)


def _conv(layer, x, weight, bias=None):
    x, padding = _operands(layer, x)
    return CONV[len(layer.kernel_size)](x, weight, bias, layer.stride, padding, layer.dilation,
                                        layer.groups)


def _patch_sums(layer: nn.Module, x: Tensor, c_out: int) -> Tensor:
    """``[N, C_out, L]``: the sum of each output channel's input patch, per position: the
    channels of each of the g groups summed first, then a g-channel box filter."""
    g = layer.groups
    xs = x.reshape(x.shape[0], g, x.shape[1] // g, *x.shape[2:]).sum(2)  # [N, g, *in]
    xs, padding = _operands(layer, xs)
    s = CONV[len(layer.kernel_size)](xs, x.new_ones(g, 1, *layer.kernel_size), None, layer.stride,
                                     padding, layer.dilation, g)
    return s.flatten(2).repeat_interleave(c_out // g, dim=1)


def _moments(layer, inputs, x, delta, group):
    """Per group: S1 and S2 ``[G, C]`` and the standardization's (w_hat, gamma, r, kappa), with
    ``x`` the convolution's own (padded) input. z = conv(x, w_hat) is read off the call's output
    y = z + b where gamma is 1 (StdConv2d); with a gain (which may be 0), or an output modified
    in place, it is recomputed."""
    y = inputs[-1] if len(inputs) > 1 else None
    w_hat, gamma, r, kappa = _standardized(layer)
    _check_forward(layer, inputs[0], w_hat, gamma)
    d = delta.flatten(2)  # [N, C, L]
    if y is None or CLASSES[_key(layer)].gain:
        z = _conv(layer, x, w_hat.reshape_as(layer.weight)).flatten(2)
    else:
        z = y.flatten(2) if layer.bias is None else y.flatten(2) - layer.bias[:, None]
    s1 = sum_groups((d * _patch_sums(layer, x, d.shape[1])).sum(2), group)
    s2 = sum_groups((d * z).sum(2), group)
    return s1, s2, (w_hat, gamma, r, kappa)


def std_conv_sq_norms(layer: nn.Module, inputs: Sequence, grad_output: Tensor,
                      names: Sequence[str], group: int) -> Tensor:
    out = grad_output.new_zeros(grad_output.shape[0] // group)
    if "bias" in names:
        out = out + sum_groups(grad_output.flatten(2).sum(2), group).pow(2).sum(1)
    if "weight" not in names and "gain" not in names:
        return out
    x = _padded(layer, inputs[0])
    s1, s2, (_, gamma, r, kappa) = _moments(layer, inputs, x, grad_output, group)
    if "gain" in names:
        out = out + layer.scale ** 2 * s2.pow(2).sum(1)
    if "weight" in names:
        a = gamma * r
        n = layer.weight[0].numel()
        scaled = grad_output * a.reshape(1, -1, *[1] * (grad_output.dim() - 2))
        out = out + conv_sq_norms(layer, [x], scaled, ["weight"], group)
        out = out - (a.pow(2) * (s1.pow(2) + (2 - kappa) * s2.pow(2))).sum(1) / n
    return out


def std_conv_grads(layer: nn.Module, inputs: Sequence, grad_output: Tensor,
                   names: Sequence[str], group: int) -> Dict[str, Tensor]:
    grads = {}
    if "bias" in names:
        grads["bias"] = sum_groups(grad_output.flatten(2).sum(2), group)
    if "weight" not in names and "gain" not in names:
        return grads
    w_hat, gamma, r, _ = _standardized(layer)
    _check_forward(layer, inputs[0], w_hat, gamma)
    G = per_example_weight_grads(layer, _padded(layer, inputs[0]), grad_output,
                                 group).flatten(2)  # [G, C, n]
    s2 = (G * w_hat).sum(2)  # <G_c, w_hat_c>
    if "gain" in names:
        grads["gain"] = (layer.scale * s2).reshape(G.shape[0], *layer.gain.shape)
    if "weight" in names:
        n = w_hat.shape[1]
        gv = (G - G.mean(2, keepdim=True) - w_hat * (s2 / n)[..., None]) * (gamma * r)[:, None]
        grads["weight"] = gv.reshape(G.shape[0], *layer.weight.shape)
    return grads


STD_CONV_RULE = LayerRule(grads=std_conv_grads, sq_norms=std_conv_sq_norms, with_output=True)

__all__ = ["CLASSES", "STD_CONV_RULE", "is_std_conv", "rules_for"]
