"""Unbiased probe estimates of per-example squared gradient norms (``estimator="probe"|"hybrid"``).

Definitions as in ``curvreg.tape``. For a random probe v over the probed parameters with
E[v v^T] = I, E[(g_i . v)^2] = ||g_i||^2, so with K independent probes

    s_i = (1/K) sum_k (g_i . v_k)^2        is unbiased for ||g_i||^2 (restricted to the probed
                                           parameters), and differentiable in theta.

The directional derivative g_i . v is a forward-mode quantity. By the chain rule it splits over
the recorded module calls c with outputs y_c:

    g_i . v = sum_c < d l_i / d y_{c,i} ,  (d y_{c,i} / d theta_c) v_c >

where the first factor is the tape's delta and the second is the call's *local* tangent (its
inputs held fixed). The built-in layer types are linear in their parameters jointly (Linear,
Conv, Embedding, and the affine part of the norm layers), so their local tangent is the layer
itself evaluated with parameters v_c; any other module gets it from ``torch.func.jvp``. Cost
per probe: about one extra forward of each probed layer, no per-example gradient and no Gram.

Variance (per example, one probe, g = g_i): Gaussian 2 ||g||^4; Rademacher
2 (||g||^4 - sum_j g_j^4), never larger. Both fall as 1/K. The same probes serve every example
of the batch, so the batch mean R_hat = mean_i s_i has variance 2 ||F_B||_F^2 / K for Gaussian
probes, with F_B = mean_i g_i g_i^T: relative std sqrt(2 / (K r_eff)), where
r_eff = tr(F_B)^2 / ||F_B||_F^2 <= batch size. It therefore shrinks with batch size as long as
the per-example gradients are not aligned.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten

from .rules.fallback import _children_see_constants

ESTIMATORS = ("exact", "probe", "hybrid")
DISTRIBUTIONS = ("rademacher", "gaussian")

# Layer types whose output is linear in (all of) their parameters, given the inputs.
LINEAR_IN_PARAMS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.LayerNorm,
                    nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
# Layers that ``hybrid`` keeps exact: their ghost norm costs about as little as a probe.
HYBRID_EXACT = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d,
                nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def check_options(estimator: str, num_probes, distribution: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator '{estimator}'; use one of {ESTIMATORS}")
    if not isinstance(num_probes, int) or isinstance(num_probes, bool) or num_probes < 1:
        raise ValueError(f"num_probes must be an int >= 1, got {num_probes!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown probe distribution '{distribution}'; use one of {DISTRIBUTIONS}")


def hybrid_exact(module: nn.Module, inputs) -> bool:
    """Whether ``hybrid`` computes this call exactly: cheap ghost norms (2-D Linear, Embedding,
    norm layers); everything else (convolutions, sequence Linear, fallback modules) is probed."""
    if type(module) is nn.Linear:
        return bool(inputs) and isinstance(inputs[0], Tensor) and inputs[0].dim() == 2
    return type(module) in HYBRID_EXACT


def draw(param: Tensor, distribution: str, generator: Optional[torch.Generator]) -> Tensor:
    """One probe block shaped like ``param`` with E[v v^T] = I (detached)."""
    dev = generator.device if generator is not None else param.device
    if distribution == "rademacher":
        v = torch.randint(0, 2, param.shape, generator=generator, device=dev, dtype=param.dtype)
        v = v.mul_(2).sub_(1)
    else:
        v = torch.randn(param.shape, generator=generator, device=dev, dtype=param.dtype)
    return v.to(param.device)


def local_tangents(call, names: Sequence[str], vs: Dict[str, Tensor]) -> Sequence[Tensor]:
    """(d y / d theta_names) v for each recorded output y of one call, inputs held fixed."""
    module, args, kwargs = call.module, call.args, call.kwargs or {}
    if type(module) in LINEAR_IN_PARAMS and all(k in module._parameters for k in names):
        return [_linear_tangent(module, args, kwargs, vs)]
    primals = {k: p for k, p in module.named_parameters() if k in vs}

    def run(p):
        out = functional_call(module, p, args, kwargs)
        return tuple(t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point())

    with _children_see_constants(module, names), sdpa_kernel(SDPBackend.MATH):
        primal, tangent = jvp(run, (primals,), ({k: vs[k] for k in primals},))
    same = len(primal) > max(call.index) and all(
        torch.allclose(primal[i].detach(), o.detach(), rtol=1e-4, atol=1e-5)
        for i, o in zip(call.index, call.outputs))
    if not same:
        raise ValueError(f"module '{call.path}' ({type(module).__name__}) gives different outputs "
                         "when re-run for its forward-mode tangent (is it random?); probes need a "
                         "deterministic forward")
    return [tangent[i] for i in call.index]


def _linear_tangent(module: nn.Module, args: tuple, kwargs: dict, vs: Dict[str, Tensor]) -> Tensor:
    """The layer evaluated at parameters v (zero for the parameters not probed)."""
    if type(module) is nn.Linear:
        return F.linear(args[0], vs.get("weight", torch.zeros_like(module.weight)), vs.get("bias"))
    if isinstance(module, nn.modules.conv._ConvNd):
        return module._conv_forward(args[0], vs.get("weight", torch.zeros_like(module.weight)),
                                    vs.get("bias"))
    params = {k: (vs[k] if k in vs else torch.zeros_like(p))
              for k, p in module._parameters.items() if p is not None}
    return functional_call(module, params, args, kwargs)
