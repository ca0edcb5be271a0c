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

Kronecker probes (``distribution="kronecker"``): for a weight of shape [O, *rest] (rest = the
input channels and the kernel for a convolution) the probe is v = a (x) B, with a Rademacher
vector a in {+-1}^O and an independent dense Rademacher block B over rest (1-D parameters get a
plain Rademacher vector). Then E[v v^T] = E[a a^T] (x) E[B B^T] = I, so the estimate stays
unbiased. The point is cost: a layer evaluated at v collapses to one output channel,
    conv(x, a (x) B)[o] = a_o * conv(x, B),        x (a (x) b)^T = (x . b) a,
a convolution with a single output channel (per group) instead of O of them. That removes the
probed layers' full-size tangent convolutions and their backward from the step. The price is
variance: the entries of v are no longer independent. For a per-example gradient G = [O, rest]
of one layer, Gaussian factors give Var[(a^T G B)^2] = 2 ||G||_F^4 + 6 ||G G^T||_F^2, between 1
and 4 times the dense Gaussian probe's 2 ||G||_F^4 (4 when G has rank one). The benchmark script
prints the measured noise beside the dense probes'.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from . import batchnorm
from .exact import promote_one
from .ops import ElementwiseAffine, NormalizedAffine, TransposedLinear

ESTIMATORS = ("exact", "probe", "hybrid")
DISTRIBUTIONS = ("rademacher", "gaussian", "kronecker")

# Layers that ``hybrid`` keeps exact: their ghost norm costs about as little as a probe.
HYBRID_EXACT = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d,
                nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
                nn.InstanceNorm3d, ElementwiseAffine, NormalizedAffine)
# Layer types whose output is linear in (all of) their parameters, given the inputs.
LINEAR_IN_PARAMS = (nn.Linear, TransposedLinear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + HYBRID_EXACT


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
    if type(module) in (nn.Linear, TransposedLinear):
        return bool(inputs) and isinstance(inputs[0], Tensor) and inputs[0].dim() == 2
    return type(module) in HYBRID_EXACT


class KronProbe:
    """A probe v = a (x) B for a parameter of shape [O, *rest], kept as its two factors."""

    __slots__ = ("a", "b")

    def __init__(self, a: Tensor, b: Tensor):
        self.a, self.b = a, b

    def dense(self) -> Tensor:
        return self.a.view(-1, *[1] * self.b.dim()) * self.b


def _rademacher(shape, like: Tensor, generator, dev) -> Tensor:
    v = torch.randint(0, 2, tuple(shape), generator=generator, device=dev, dtype=like.dtype)
    return v.mul_(2).sub_(1).to(like.device)


def draw(param: Tensor, distribution: str, generator: Optional[torch.Generator]):
    """One probe block shaped like ``param`` with E[v v^T] = I (detached).

    A ``KronProbe`` (its factors) for ``"kronecker"`` and a parameter of 2 or more dims, else a
    tensor."""
    dev = generator.device if generator is not None else param.device
    if distribution == "kronecker" and param.dim() >= 2:
        a = _rademacher(param.shape[:1], param, generator, dev)
        return KronProbe(a, _rademacher(param.shape[1:], param, generator, dev))
    if distribution in ("rademacher", "kronecker"):
        return _rademacher(param.shape, param, generator, dev)
    v = torch.randn(param.shape, generator=generator, device=dev, dtype=param.dtype)
    return v.to(param.device)


def local_tangents(call, names: Sequence[str], vs: Dict[str, Tensor]) -> Sequence[Tensor]:
    """(d y / d theta_names) v for each recorded output y of one call, inputs held fixed."""
    module, args, kwargs = call.module, call.args, call.kwargs or {}
    if isinstance(vs.get("weight"), KronProbe) and all(k in module._parameters for k in names):
        if type(module) is nn.Linear:
            return [_kron_linear_tangent(module, args[0], vs)]
        if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            return [_kron_conv_tangent(module, args[0], vs)]
    vs = {k: v.dense() if isinstance(v, KronProbe) else v for k, v in vs.items()}
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
    if isinstance(module, ElementwiseAffine):
        v = vs["weight"].reshape(module.weight.shape)  # the shell may hold a reshaped view
        return args[0] * v if module.kind == "mul" else v.expand(module.other_shape)
    if isinstance(module, TransposedLinear):
        t = args[0] @ vs.get("weight", torch.zeros_like(module.weight))
        return t + vs["bias"] if "bias" in vs else t
    if isinstance(module, NormalizedAffine):  # its weight may be a constant, not a parameter
        xhat, shape = args[0], (1, -1) + (1,) * (args[0].dim() - 2)
        t = xhat * vs["weight"].view(shape) if "weight" in vs else torch.zeros_like(xhat)
        return t + vs["bias"].view(shape) if "bias" in vs else t
    params = {k: (vs[k] if k in vs else torch.zeros_like(p))
              for k, p in module._parameters.items() if p is not None}
    return functional_call(module, params, args, kwargs)


def _kron_linear_tangent(module: nn.Linear, x: Tensor, vs: Dict[str, Tensor]) -> Tensor:
    """x (a (x) b)^T + v_bias = (x . b) a + v_bias: one dot product per position."""
    w = vs["weight"]
    t = (x @ w.b).unsqueeze(-1) * w.a
    return t + vs["bias"] if "bias" in vs else t


def kron_conv(x: Tensor, probe: KronProbe, groups: int, conv) -> Tensor:
    """conv(x, a (x) B)[o] = a_o conv(x, B)_{group(o)}: one output channel per group.
    ``conv(x, kernel)`` convolves with the layer's own stride, padding, dilation and groups."""
    kernel = probe.b.expand(groups, *probe.b.shape).contiguous()  # [g, C_in / g, *k]
    z = conv(x, kernel)  # [N, g, *S']
    if groups > 1:
        z = z.repeat_interleave(probe.a.shape[0] // groups, dim=1)
    return z * probe.a.view(1, -1, *[1] * (x.dim() - 2))


def _kron_conv_tangent(module: nn.modules.conv._ConvNd, x: Tensor, vs: Dict[str, Tensor]) -> Tensor:
    t = kron_conv(x, vs["weight"], module.groups, lambda z, k: module._conv_forward(z, k, None))
    return t + vs["bias"].view(1, -1, *[1] * (x.dim() - 2)) if "bias" in vs else t


@contextmanager
def _children_see_constants(module: nn.Module, names: Sequence[str]):
    """While re-running ``module`` under ``torch.func`` for its generic tangent, let each child
    that owns a differentiated parameter see the parameter's constant value inside its own
    forward.

    Only the uses of a parameter made by ``module`` itself are differentiated (e.g. a tied
    embedding matrix reused in the parent's own op); the child's own use is counted for the
    child, so it must not be counted twice.
    """
    owners = {}
    for name in names:
        if "." in name:
            path, leaf = name.rsplit(".", 1)
            owners.setdefault(path, []).append(leaf)
    handles, saved = [], []
    originals = {path: {k: module.get_submodule(path)._parameters[k] for k in leaves}
                 for path, leaves in owners.items()}

    def pre(child, _args, leaves, path):
        saved.append({k: child._parameters[k] for k in leaves})
        child._parameters.update(originals[path])  # constant for the jvp, live for autograd

    def post(child, _args, _out):
        child._parameters.update(saved.pop())

    try:
        for path, leaves in owners.items():
            child = module.get_submodule(path)
            handles.append(child.register_forward_pre_hook(
                lambda c, a, lv=leaves, p=path: pre(c, a, lv, p)))
            handles.append(child.register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------ the estimators
def _group_sum(t: Tensor, m: int) -> Tensor:
    return t.view(-1, m).sum(1)


def probe_dot(work, vs, n: int) -> Optional[Tensor]:
    """Per example, g_i . v over the parameters named in ``work`` ((call, deltas, names));
    ``vs`` maps parameter ids to their probes."""
    dot = None
    for c, d, names in work:
        local = {k: vs[key] for k, key in zip(c.names, c.keys) if k in names}
        tangents = local_tangents(c, names, local)
        for t, delta, dim in zip(tangents, d, c.dims):
            if delta is None:
                continue
            part = (promote_one(delta) * promote_one(t)).movedim(dim, 0).reshape(n, -1).sum(1)
            dot = part if dot is None else dot + part
    return dot


def probe_sq_norms(work, params: Dict[int, tuple], n: int, m: int, num_probes: int,
                   distribution: str, generator: Optional[torch.Generator]) -> Optional[Tensor]:
    """(1/K) sum_k (g_group . v_k)^2 over the parameters named in ``work``; None if empty.
    Probes are drawn in model order (``params``), so estimates are reproducible."""
    if not work:
        return None
    keys = {key for c, _, names in work for k, key in zip(c.names, c.keys) if k in names}
    order = [key for key in params if key in keys]
    est = None
    for _ in range(num_probes):
        vs = {key: draw(params[key][1], distribution, generator) for key in order}
        g = _group_sum(probe_dot(work, vs, n), m)
        est = g * g if est is None else est + g * g
    return est / num_probes


# Torch functions whose forward-mode derivative PyTorch also differentiates backward correctly,
# each checked against double backprop in tests/test_batchnorm.py. A forward that called only
# these gets its directional derivatives from one forward-mode re-run (F.batch_norm written
# with elementary ops: see batchnorm.explicit); any other function keeps the double backward.
# Left out on purpose: layer_norm and group_norm (the backward through their forward-mode
# derivative is 14-97% off), cross_entropy / log_softmax / logsumexp (theirs fails with an
# in-place error in torch 2.14), dropout (the re-run would draw new masks).
FORWARD_AD_FUNCS = frozenset({
    F.conv1d, F.conv2d, F.conv3d, F.linear, F.batch_norm, F.relu, F.gelu, F.silu, torch.tanh,
    torch.sigmoid, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d,
    F.pad, torch.cat, torch.flatten, Tensor.flatten, Tensor.add, Tensor.add_, Tensor.__add__,
    Tensor.__iadd__, Tensor.mul, Tensor.__mul__, Tensor.dim, Tensor.size, Tensor.__getitem__,
    Tensor.view, Tensor.reshape, Tensor.mean, Tensor.relu, torch.relu,
    # reads to Python numbers (BatchNorm's momentum=None reads num_batches_tracked) and of
    # metadata
    Tensor.__float__, Tensor.__int__, Tensor.__bool__, Tensor.__len__, Tensor.item,
    Tensor.shape.__get__, Tensor.dtype.__get__, Tensor.device.__get__, Tensor.ndim.__get__})


def forward_ad_ready(rec) -> bool:
    """Whether ``rec``'s forward can be re-run in forward mode (see ``FORWARD_AD_FUNCS``)."""
    return rec.root is not None and rec.funcs <= FORWARD_AD_FUNCS


def quiet_make_dual(p: Tensor, v: Tensor) -> Tensor:
    """``fwAD.make_dual``, without the warning PyTorch's first call emits (it loads jit
    decompositions)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        return fwAD.make_dual(p, v)


def _rerun_tangents(rec, tangents: Dict[int, Tensor]) -> list:
    """Tangents of the model's outputs along ``tangents`` ({parameter id: direction}), from one
    forward-mode re-run of the recorded call on the same inputs and parameters. Buffers are
    cloned so that running statistics update once, in the taped forward."""
    args, kwargs, _ = rec.root
    names = {key: rec.params[key][0] for key in tangents}
    buffers = {k: b.clone() for k, b in rec.model.named_buffers()}
    recording, rec.recording = rec.recording, False  # a re-run inside ``with`` is not recorded
    try:
        with fwAD.dual_level(), _ExplicitBatchNorm():
            duals = {names[key]: quiet_make_dual(rec.params[key][1], v) for key, v in tangents.items()}
            out = functional_call(rec.model, {**buffers, **duals}, args, kwargs or {})
            return [fwAD.unpack_dual(t).tangent for t in _outputs(out)]
    finally:
        rec.recording = recording


class _ExplicitBatchNorm(TorchFunctionMode):
    """F.batch_norm as elementary ops (``batchnorm.explicit``) during a forward-mode re-run."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.batch_norm:
            return batchnorm.explicit(args, kwargs or {})
        return func(*args, **(kwargs or {}))


def _outputs(out) -> list:
    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()]


def output_positions(rec) -> list:
    """Positions, among ``_outputs`` of the recorded model output, of those that carry a
    gradient (the re-run's outputs line up with them)."""
    return [i for i, t in enumerate(_outputs(rec.root[2])) if t.requires_grad]


def differentiable_outputs(rec) -> list:
    """The recorded model output's tensors that carry a gradient."""
    outs = _outputs(rec.root[2])
    return [outs[i] for i in output_positions(rec)]


def batch_stats_probe(losses: Tensor, live, reach: set, params: Dict[int, tuple], n: int, m: int,
                      num_probes: int, distribution: str, generator: Optional[torch.Generator],
                      control_variate: bool, create_graph: bool, rec=None,
                      first: Optional[Dict[int, Tensor]] = None,
                      first_tangents: Optional[list] = None) -> Tensor:
    """The probed part of ``batch_norm="unbiased"``, per group, over the parameters ``reach``:
    (1/K) sum_k (G_k . v_k)^2 (``bn_estimator="probe"``) or (1/K) sum_k [(G_k . v_k)^2 -
    (U_k . v_k)^2] (``"control_variate"``), where G_k . v is a directional derivative of
    the loss vector through the true graph, statistics included.

    With ``rec`` (a recording whose forward ``forward_ad_ready`` accepts): J v = <d l_i / d o_i,
    o_dot_i> with o_dot the model output's tangent from one forward-mode re-run (rows are
    examples: the loss of example i reads row i of the output, which the independence check
    verifies). Otherwise with a dummy w: a = J^T w (one backward, graph kept) and
    J v = d <a, v> / dw (double backward). Both are exact and differentiable. ``first``: the
    first probe ({parameter id: dense block}), drawn before the forward by a shared forward
    (``curvreg.shared_forward``); ``first_tangents``: the model output's tangents along it from
    that forward, which then replace the first re-run."""
    order = [key for key in params if key in reach]
    if rec is not None:
        positions = output_positions(rec)
        out_deltas = torch.autograd.grad(losses.sum(), differentiable_outputs(rec),
                                         create_graph=create_graph, retain_graph=True,
                                         allow_unused=True)
    else:
        w = torch.zeros_like(losses, requires_grad=True)
        a = torch.autograd.grad(losses, [params[key][1] for key in order], w,
                                create_graph=True, allow_unused=True)
        used = [(key, t) for key, t in zip(order, a) if t is not None]
    work = [(c, d, [k for k, key in zip(c.names, c.keys) if key in reach]) for c, d in live]
    work = [item for item in work if control_variate and item[2]]
    est = torch.zeros(n // m, dtype=losses.dtype, device=losses.device)
    for k in range(num_probes):
        if k == 0 and first is not None:
            vs = dense = first
        else:
            vs = {key: draw(params[key][1], distribution, generator) for key in order}
            dense = {key: v.dense() if isinstance(v, KronProbe) else v for key, v in vs.items()}
        if rec is not None and order:
            tangents = first_tangents if k == 0 and first_tangents is not None else \
                _rerun_tangents(rec, {key: dense[key] for key in order})
            tangents = [tangents[i] for i in positions]
            jv = sum((d * t).reshape(n, -1).sum(1) for d, t in zip(out_deltas, tangents)
                     if d is not None and t is not None)
            g = _group_sum(jv if isinstance(jv, Tensor) else losses.new_zeros(n), m)
            est = est + g * g
        elif rec is None and used:
            proj = sum((t * dense[key]).sum() for key, t in used)
            g = _group_sum(torch.autograd.grad(proj, w, create_graph=create_graph,
                                               retain_graph=True)[0], m)
            est = est + g * g
        u = probe_dot(work, vs, n) if work else None
        if u is not None:
            u = _group_sum(u, m)
            est = est - u * u
    est = est / num_probes
    return est if create_graph else est.detach()
