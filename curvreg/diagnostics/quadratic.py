"""Hessian quadratic forms v^T H v by second-order forward propagation (no backward pass).

v^T H v = d^2/de^2 L(theta + e v) at e = 0. For ``nn.Sequential`` models built from the layers
below, push (h, h', h'') = the activation and its first and second e-derivatives through the
layers:

    affine layer y = A(h; W) + b (Linear, Conv):  y' = A(h'; W) + A(h; V) + v_b
                                                   y'' = A(h''; W) + 2 A(h'; V)
    elementwise phi:                               y' = phi'(h) h',  y'' = phi'(h) h'' + phi''(h) h'^2
    linear parameter-free maps (Flatten, average pooling, Identity, eval Dropout): applied to all three
    eval-mode BatchNorm (per-channel affine in h and in (gamma, beta)): as an affine layer

and at the logits z: d^2/de^2 l(z) = z'^T (d^2 l / dz^2) z' + (dl/dz) . z'' (autograd on z only).
For a dense layer this costs 5 matmuls (W on [h'; h''], V on [h; h']) against 3 for a plain
forward + backward, so about 1.7x, where an HVP by double backprop costs about 3x. Models with
any other module fall back to v . HVP (exact either way).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.Softplus)
LINEAR_MAPS = (nn.Flatten, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
               nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Identity)
AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
Triple = Tuple[Tensor, Tensor, Tensor]


def layers_if_supported(model: nn.Module) -> Optional[List[nn.Module]]:
    """The flat list of leaf layers if ``model`` is a (nested) Sequential of supported layers."""
    if not isinstance(model, nn.Sequential):
        return None
    out = []
    for m in model:
        if isinstance(m, nn.Sequential):
            inner = layers_if_supported(m)
            if inner is None:
                return None
            out += inner
        elif type(m) in AFFINE + ELEMENTWISE + LINEAR_MAPS:
            out.append(m)
        elif type(m) is nn.Dropout and not m.training:
            out.append(m)
        elif type(m) in _BN and not m.training and m.running_mean is not None:
            out.append(m)
        else:
            return None
    return out


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a + b


def _affine(m: nn.Module, t: Triple, v: Dict[str, Tensor], own: Dict[str, str]) -> Triple:
    """Linear/Conv; ``None`` stands for an all-zero derivative (the input's, at the start)."""
    h, d, s = t
    n = h.shape[0]
    if type(m) is nn.Linear:
        op = lambda x, w, b=None: F.linear(x, w, b)  # noqa: E731
    else:
        op = lambda x, w, b=None: m._conv_forward(x, w, b)  # noqa: E731
    y = op(h, m.weight, m.bias)
    d1 = s1 = None
    if d is not None:  # W h'' and W h' in one call
        wd = op(torch.cat([d, s]), m.weight)
        d1, s1 = wd[:n], wd[n:]
    vw, vb = v.get(own.get("weight")), v.get(own.get("bias"))
    if vw is not None:
        if d is None:
            d1 = _add(d1, op(h, vw))
        else:  # V h and V h' in one call
            vh = op(torch.cat([h, d]), vw)
            d1, s1 = _add(d1, vh[:n]), _add(s1, 2 * vh[n:])
    if vb is not None:
        d1 = _add(d1, (vb if type(m) is nn.Linear else vb.view(-1, *[1] * (h.dim() - 2))).expand_as(y))
    if d1 is not None and s1 is None:
        s1 = torch.zeros_like(d1)
    return y, d1, s1


def _batchnorm(m: nn.Module, t: Triple, v: Dict[str, Tensor], own: Dict[str, str]) -> Triple:
    h, d, s = t
    shape = (1, -1) + (1,) * (h.dim() - 2)
    inv = (m.running_var + m.eps).rsqrt().view(shape)
    xhat = (h - m.running_mean.view(shape)) * inv
    gamma = m.weight.view(shape) if m.weight is not None else torch.ones_like(inv)
    y = xhat * gamma + (m.bias.view(shape) if m.bias is not None else 0.0)
    d1 = s1 = None
    if d is not None:
        d1, s1 = d * inv * gamma, s * inv * gamma
    vg, vb = v.get(own.get("weight")), v.get(own.get("bias"))
    if vg is not None:
        d1 = _add(d1, xhat * vg.view(shape))
        if d is not None:
            s1 = _add(s1, 2 * d * inv * vg.view(shape))
    if vb is not None:
        d1 = _add(d1, vb.view(shape).expand_as(y))
    if d1 is not None and s1 is None:
        s1 = torch.zeros_like(d1)
    return y, d1, s1


def _elementwise(m: nn.Module, t: Triple) -> Triple:
    h, d, s = t
    if type(m) is nn.ReLU:
        if d is None:
            return torch.relu(h), None, None
        mask = (h > 0).to(h.dtype)
        return torch.relu(h), d * mask, s * mask
    with torch.enable_grad():
        x = h.detach().requires_grad_(True)
        y = m(x)
        if d is None:
            return y.detach(), None, None
        g1, = torch.autograd.grad(y.sum(), x, create_graph=True)
        g2, = torch.autograd.grad(g1.sum(), x, allow_unused=True)
    g1 = g1.detach()
    g2 = torch.zeros_like(h) if g2 is None else g2
    return y.detach(), g1 * d, g1 * s + g2 * d * d


def _loss_second(loss_fn: Callable, z: Tensor, dz: Tensor, sz: Tensor, y) -> Tensor:
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        losses = loss_fn(zz, y)
        g, = torch.autograd.grad(losses.sum(), zz, create_graph=True)
        hz, = torch.autograd.grad((g * dz).sum(), zz, allow_unused=True)
    hz = torch.zeros_like(z) if hz is None else hz
    return (g.detach() * sz).sum() + (hz * dz).sum()


@torch.no_grad()
def sequential_quadratic_form(layers: List[nn.Module], names: Dict[int, Dict[str, str]],
                              loss_fn: Callable, x: Tensor, y, v: Dict[str, Tensor]) -> Tensor:
    """sum_i d^2/de^2 l_i(theta + e v) over the batch (not divided by N)."""
    t = (x, None, None)
    for m in layers:
        own = names.get(id(m), {})
        if type(m) in AFFINE:
            t = _affine(m, t, v, own)
        elif type(m) in _BN:
            t = _batchnorm(m, t, v, own)
        elif type(m) in ELEMENTWISE:
            t = _elementwise(m, t)
        elif t[1] is None:  # linear parameter-free map, or eval Dropout (identity)
            t = (m(t[0]), None, None)
        else:
            n = t[0].shape[0]
            out = m(torch.cat(t))
            t = (out[:n], out[n:2 * n], out[2 * n:])
    if t[1] is None:  # nothing was perturbed
        return t[0].new_zeros(())
    return _loss_second(loss_fn, *t, y)
