"""GradNormTape: exact, differentiable per-example squared gradient norms.

Definitions used throughout curvreg. For a batch of N examples with per-example losses l_i,
    g_i = d l_i / d theta            (the gradient of example i's loss, *not* divided by N)
    R   = mean_i ||g_i||^2           (the curvature penalty; the empirical Fisher trace)
where theta ranges over every parameter with ``requires_grad=True`` that the forward used.
With ``group_size = m`` the N examples form N/m disjoint groups of m consecutive examples and
    sq_k = || d/dtheta mean_{i in group k} l_i ||^2,
so m = 1 is the per-example penalty of Geng et al. and m = N the squared full-batch gradient norm.

How: during the forward the tape records, for each op call that uses a trainable parameter and
that a rule covers (``curvreg.ops``: F.linear, convolutions, embedding, norms, elementwise
scale/shift), its inputs and output y, whatever module makes the call; other parameter uses are
recorded per module call and take the exact per-example loop (``curvreg.rules.fallback``). Afterwards one ``autograd.grad`` of sum_i l_i gives delta = dL/dy for
all recorded outputs; slice i of delta is d l_i / d y_i because examples do not interact. Each
layer rule turns (inputs, delta) into sum_p ||g_i(p)||^2, e.g. ||delta_i||^2 ||x_i||^2 for a
linear layer (the "ghost norm"), without forming g_i. Every op is differentiable, so
``(losses.mean() + alpha * sq.mean()).backward()`` is exact double backprop.
"""
from __future__ import annotations

import warnings
import weakref
from collections import Counter
from contextlib import contextmanager
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from . import batchnorm, fused, ops
from .probe import LINEAR_IN_PARAMS, KronProbe, check_options, draw, hybrid_exact, local_tangents
from .rules import LayerRule, fallback_grads, merge_rules, sq_from_grads


class FallbackWarning(UserWarning):
    """Some modules have no exact rule and use the slower per-example VJP fallback."""


class _Call:
    """One recorded call of a module that used trainable parameters.

    Its outputs are kept as gradient edges (autograd node, output number), the targets of the
    delta pass, not as tensors: a module's output is often dead after the next op (a ReLU saves
    its own result), and holding it would keep one activation per layer alive through the whole
    step. Calls without an exact rule (fallback) and probe estimators re-run the module and
    compare, so they keep the tensors too (``outputs``; otherwise ``None``).
    A side effect: an in-place op on a rule layer's output (``nn.ReLU(inplace=True)``) is
    harmless, since delta is taken at the edge recorded before it.
    """

    __slots__ = ("module", "path", "args", "kwargs", "edges", "outputs", "index", "versions",
                 "names", "keys", "op", "position_wise", "dims", "origin")

    def __init__(self, module, path, args, kwargs, output, used: Dict[str, int], by_rule: bool,
                 op: Optional[str] = None, position_wise: bool = False):
        self.module, self.path, self.args, self.kwargs = module, path, args, kwargs
        self.op, self.position_wise = op, position_wise  # op: set for op-level calls (curvreg.ops)
        self.origin = None  # for an output expanded to the batch: the edge of the unexpanded one
        floats = _float_tensors(output)
        self.index = [i for i, t in enumerate(floats) if t.requires_grad]  # recorded outputs
        self.edges = [get_gradient_edge(floats[i]) for i in self.index]
        # ``by_rule``: a rule (or a closed-form probe tangent) will handle this module, which
        # also needs one output and the module's own parameters (see ``GradNormTape._exact``).
        by_rule = by_rule and len(self.index) == 1 and all(k in module._parameters for k in used)
        self.outputs = None if by_rule else [floats[i] for i in self.index]
        self.names = sorted(used)                 # parameter names relative to ``module``
        self.keys = [used[k] for k in self.names]  # id() of each parameter
        self.versions = [t._version for t in self._tensors()]
        self.dims = _example_dims(module, [floats[i] for i in self.index])

    @property
    def where(self) -> str:
        """``module 'path' (Type)`` or ``op F.linear in module 'path'``, for messages."""
        if self.op is not None:
            return f"op {self.op} in module '{self.path}'"
        return f"module '{self.path}' ({type(self.module).__name__})"

    def _tensors(self):
        flat = _flat(self.args) + (_flat(self.kwargs) if self.kwargs else [])
        return [t for t in flat if isinstance(t, Tensor)] + list(self.outputs or ())

    def check_versions(self):
        if any(t._version != v for t, v in zip(self._tensors(), self.versions)):
            what = "an input or output" if self.outputs else "an input"
            raise RuntimeError(
                f"{what} of {self.where} was modified in place after its forward (for "
                "example by nn.ReLU(inplace=True) or x.add_()); per-example gradients would be "
                "wrong. Use out-of-place ops (inplace=False) in the taped model.")


class _UsageMode(TorchFunctionMode):
    """Sees every torch op of the forward, to learn which module call used which parameter."""

    def __init__(self, tape: "GradNormTape"):
        super().__init__()
        self.tape = tape

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tape = self.tape
        if not tape._recording:
            return func(*args, **kwargs)
        refused = ops.NO_DOUBLE_BACKWARD.get(func)
        if refused is not None and _needs_grad(args, kwargs):
            raise ValueError(f"{refused[0]} in module '{tape._where()}' has no second derivative "
                             "in PyTorch, so a penalty on gradients through it cannot be trained. "
                             f"Use {refused[1]} instead.")
        if (func is F.batch_norm and batchnorm.uses_batch_stats(args, kwargs)
                and tape._over_examples(args[0] if args else kwargs.get("input"))):
            if tape.batch_norm:
                return tape._batch_stats_norm(args, kwargs)
            if _needs_grad(args, kwargs):
                raise ValueError(_mixing_message(
                    tape._where(), "F.batch_norm", "normalizes with the statistics of the batch, so "
                    "each loss depends on the other examples"))
        if func in _BROADCASTING and tape._unbatched and len(args) == 2:
            args = tape._broadcast(args)
        if (func is F.linear and fused.can_fuse(args, kwargs, tape._params, tape.fuse_linear)):
            holder = fused.Holder()
            tape._holders.append(holder)
            out = fused.TapedLinear.apply(args[0], args[1], args[2] if len(args) == 3 else None,
                                          holder)
        else:
            out = func(*args, **kwargs)
        tape._on_op(func, args, kwargs, out)
        return out


def _flat(obj) -> list:
    """Leaves of a pytree, with fast paths for a tensor and a flat tuple."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, tuple) and all(isinstance(a, Tensor) for a in obj):
        return list(obj)
    return tree_flatten(obj)[0]


def _needs_grad(args, kwargs) -> bool:
    """Whether any tensor argument of an op requires grad."""
    return any(isinstance(t, Tensor) and t.requires_grad for t in _flat((args, kwargs)))


def _float_tensors(obj) -> List[Tensor]:
    return [t for t in _flat(obj) if isinstance(t, Tensor) and t.is_floating_point()]


def _path(paths: Dict[int, str], module: nn.Module) -> str:
    return paths.get(id(module)) or "<root>"


def _mixing_reason(module: nn.Module, batch_norm: Optional[str]) -> Optional[str]:
    """Why the tape cannot take ``module`` in its current mode, or None."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return None
    batch_stats = module.training or module.running_mean is None
    if (batch_stats and batch_norm and isinstance(module, nn.SyncBatchNorm)
            and torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return ("is a SyncBatchNorm in training mode across processes; the tape's batch-statistics "
                "semantics cover one process's batch. Convert it to BatchNorm per rank (statistics "
                "of the local batch) or put it in eval mode")
    if batch_stats and not batch_norm:
        state = "in training mode" if module.training else "without running statistics"
        return (f"is a BatchNorm {state}: each loss depends on the other examples through the "
                "batch statistics, so per-example gradients are not separable")
    return None


class GradNormTape:
    """Scope that records a forward pass and returns per-example squared gradient norms.

    Example:
        >>> with curvreg.GradNormTape(model) as tape:
        ...     logits = model(x)
        >>> losses = F.cross_entropy(logits, y, reduction="none")      # [N]
        >>> sq = tape.per_example_sq_grad_norms(losses)                # [N], differentiable
        >>> (losses.mean() + alpha * sq.mean()).backward()

    Args:
        model: any ``nn.Module``; examples must be independent along dim 0 of every recorded
            output (checked: ``check_independence``).
        rules: extra ``{module type: LayerRule}`` entries, applied to every call of that exact
            module type (the ops inside are then not recorded separately). Parameter uses no
            rule covers take the exact per-example loop fallback (with a warning).
        allow_override: let ``rules`` replace a built-in rule.
        group_size: m; see the module docstring. Must divide the batch size.
        estimator: ``"exact"`` (default): the exact values. ``"probe"``: an unbiased,
            differentiable estimate from ``num_probes`` random probes over every parameter (see
            ``curvreg.probe``). ``"hybrid"``: exact for the parameters of cheap layers (Linear on
            2-D inputs, Embedding, norm layers) plus probes over the rest (convolutions,
            sequence Linear, fallback modules); still unbiased. After a call, ``tape.methods``
            maps each module path to the method that ran for it.
        num_probes: K >= 1 probes averaged by the probe estimators.
        generator: ``torch.Generator`` for the probes (reproducible estimates).
        distribution: ``"rademacher"`` (default, lower variance) or ``"gaussian"`` probes.
        fuse_linear: ``curvreg.fused`` policy: ``"auto"`` (by layer size), True, False.
        check_independence: ``"once"`` (default: once per model and recorded structure),
            ``"always"`` or ``"never"``; see ``_check_independent``.
        batch_norm: how to take a BatchNorm that normalizes with its batch statistics (training
            mode, or no running statistics); see ``curvreg.batchnorm``. ``None`` (default):
            refuse it before the forward. ``"unbiased"``: an unbiased, differentiable estimate
            of the true ||g_i||^2 (the statistics' coupling included), with ``num_probes``
            probes from ``generator``. ``"frozen"``: the exact norms with this batch's
            statistics held constant, a different quantity.
        bn_estimator: ``"probe"`` (default) or ``"control_variate"``: how ``"unbiased"`` covers
            the parameters the statistics depend on.

    The tape registers hooks only inside ``with``; they are removed on exit, even after an
    exception. It stores nothing on modules or parameters and never changes train/eval mode.
    """

    def __init__(self, model: nn.Module, *, rules: Optional[Mapping[type, LayerRule]] = None,
                 allow_override: bool = False, group_size: int = 1, estimator: str = "exact",
                 num_probes: int = 1, generator: Optional[torch.Generator] = None,
                 distribution: str = "rademacher", fuse_linear="auto",
                 check_independence: str = "once", batch_norm: Optional[str] = None,
                 bn_estimator: str = "probe"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradNormTape needs an nn.Module, got {type(model).__name__}")
        if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            raise TypeError("GradNormTape cannot record a torch.compile'd model: compiled code "
                            "bypasses the op recording. Tape the uncompiled module (model._orig_mod) "
                            "and compile the training step around the tape instead, or not at all.")
        if fuse_linear not in (True, False, "auto"):
            raise ValueError(f"fuse_linear must be True, False or 'auto', got {fuse_linear!r}")
        if check_independence not in _CHECKS:
            raise ValueError(f"check_independence must be one of {_CHECKS}, got "
                             f"{check_independence!r}")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        check_options(estimator, num_probes, distribution)
        if batch_norm is not None and batch_norm not in batchnorm.MODES:
            raise ValueError(f"batch_norm must be None or one of {batchnorm.MODES}, got {batch_norm!r}")
        if bn_estimator not in batchnorm.ESTIMATORS:
            raise ValueError(f"bn_estimator must be one of {batchnorm.ESTIMATORS}, got {bn_estimator!r}")
        self.batch_norm, self.bn_estimator = batch_norm, bn_estimator
        self._switch = batchnorm.Switch()
        self.model, self.group_size = model, group_size
        self.estimator, self.num_probes = estimator, num_probes
        self.generator, self.distribution = generator, distribution
        self.methods: Dict[str, str] = {}
        self.fuse_linear = fuse_linear  # curvreg.fused: "auto" by layer size, True always, False never
        self.check_independence = check_independence
        self.rules = merge_rules(rules, allow_override)
        self._module_rules = frozenset(rules or ())  # applied per module call, not per op
        self._handles: list = []
        self._mode: Optional[_UsageMode] = None
        self._recording = False
        self._reset()

    # ----------------------------------------------------------------- recording
    def _reset(self):
        self._calls: List[_Call] = []
        self._outside: List[tuple] = []  # (param name, op output) for uses outside any module
        self._stack: List[list] = []
        self._holders: List[fused.Holder] = []  # one per fused F.linear call
        self._n: Optional[int] = None
        # op outputs without an example dim (position tables looked up with [1, T] ids), by id,
        # until a broadcasting op meets them with the batch (see _broadcast)
        self._unbatched: Dict[int, tuple] = {}
        self._bn_reach: List[frozenset] = []  # per batch-statistics normalization: the ids of
        # the parameters used before it (see curvreg.batchnorm)
        self._seen: set = set()       # ids of the parameters used so far in the forward
        self._bn_inside: set = set()  # ids of the module calls that ran such a normalization
        # id of a reshaped view of a parameter (ops.VIEWS) -> (view, Parameter, module that made
        # it): consumed by an elementwise rule as the parameter itself, otherwise a use of the
        # parameter (see _on_op, _post_hook and the view check in _deltas)
        self._views: Dict[int, tuple] = {}
        self._view_calls: Dict[int, list] = {}  # view id -> the rule calls that consumed it
        self._view_covered: set = set()  # (id(module), id(param)) of rule-covered view uses

    def __enter__(self) -> "GradNormTape":
        if self._mode is not None:
            raise RuntimeError("this GradNormTape is already active; tapes do not nest")
        self._params = {id(p): (n, p) for n, p in self.model.named_parameters() if p.requires_grad}
        if not self._params:
            what = "differentiate" if self.estimator == "exact" else "probe"
            raise ValueError(f"nothing to {what}: the model has no parameter with "
                             "requires_grad=True")
        self._paths = {id(m): p for p, m in self.model.named_modules()}
        for path, module in self.model.named_modules():
            reason = _mixing_reason(module, self.batch_norm)
            if reason:
                raise ValueError(_mixing_message(path or "<root>", type(module).__name__, reason))
        self._reset()
        self._local: Dict[int, Dict[int, str]] = {}
        try:
            for module in self._modules_with_params():
                self._handles.append(module.register_forward_pre_hook(self._pre_hook))
                self._handles.append(module.register_forward_hook(self._post_hook, with_kwargs=True))
            # The fused attention kernels have no double backward; the math kernel computes the
            # same function with differentiable ops (nested calls included).
            self._sdpa = sdpa_kernel(SDPBackend.MATH)
            self._sdpa.__enter__()
            self._mode = _UsageMode(self)
            self._mode.__enter__()
        except BaseException:
            self._remove()
            raise
        self._recording = True
        return self

    def __exit__(self, *exc) -> None:
        self._recording = False
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._sdpa.__exit__(*exc)
        self._remove()

    def _modules_with_params(self):
        """Modules whose subtree holds a trainable parameter (only these can use one)."""
        for module in self.model.modules():
            if module is self.model or any(id(p) in self._params for p in module.parameters()):
                yield module

    def _remove(self):
        for h in self._handles:
            h.remove()
        self._handles, self._mode, self._stack = [], None, []

    def _pre_hook(self, module, args):
        if not self._recording:
            return
        with torch._C.DisableTorchFunction():  # bookkeeping: keep it out of _UsageMode
            self._enter_call(module, args)

    def _enter_call(self, module, args):
        reason = _mixing_reason(module, self.batch_norm)
        if reason:
            raise ValueError(_mixing_message(_path(self._paths, module), type(module).__name__, reason))
        if module is self.model:
            self._check_batch(args)
        self._stack.append([module, {}])

    def _check_batch(self, args):
        first = next((t for t in _flat(args) if isinstance(t, Tensor) and t.dim()), None)
        if first is None:
            return
        n = first.shape[0]
        if self._n is not None and n != self._n:
            raise ValueError(f"the model's forward ran twice inside one tape with different batch "
                             f"sizes ({self._n}, then {n}); use one tape per forward pass")
        self._n = n

    def _post_hook(self, module, args, kwargs, output):
        if not self._recording or not self._stack or self._stack[-1][0] is not module:
            return
        with torch._C.DisableTorchFunction():
            for vid, (view, param, maker) in list(self._views.items()):
                if maker is module and vid not in self._view_calls:
                    # no rule consumed this view: the view op was an ordinary use by ``module``
                    self._attribute(module, param, view)
                    del self._views[vid]
        _, used = self._stack.pop()
        if used:
            with torch._C.DisableTorchFunction():  # bookkeeping: keep it out of _UsageMode
                self._record(module, args, kwargs, output, used)

    def _record(self, module, args, kwargs, output, used):
        # A module rule (passed by the user) or a closed-form probe tangent needs no outputs; the
        # fallback and the probes' generic jvp re-run the module and compare with them.
        by_rule = type(module) in self._module_rules and (self.estimator == "exact"
                                                          or type(module) in LINEAR_IN_PARAMS)
        if not by_rule and any((id(module), key) in self._view_covered for key in used.values()):
            raise ValueError(
                f"module '{_path(self._paths, module)}' ({type(module).__name__}) uses a parameter "
                "both through a reshaped view consumed by an elementwise rule and in an op no "
                "rule covers; the per-example loop cannot separate the two. Use the parameter "
                "in one form (e.g. store it in the shape it is applied in).")
        if not by_rule and id(module) in self._bn_inside:
            raise ValueError(
                f"module '{_path(self._paths, module)}' ({type(module).__name__}) uses parameters "
                "without an exact rule and normalizes with batch statistics inside its forward; "
                "the per-example loop cannot re-run it one example at a time. Give it a rule "
                "(GradNormTape(rules=...)), or put its BatchNorm in eval mode.")
        self._calls.append(_Call(module, _path(self._paths, module), args, kwargs, output,
                                 used, by_rule))

    def _broadcast(self, args):
        """Expand an unbatched rule-op output to the batch where it meets batched data.

        ``x + pos`` with pos = embedding(position_ids [1, T]) is [N, T, d] + [1, T, d]; replacing
        pos by its expansion to [N, T, d] computes the same sum, and the expansion's gradient
        row i is d l_i / d pos. The op's call is re-pointed at the expansion, with its inputs
        expanded alike, so its rule sees an ordinary per-example call. Every other use of pos
        is checked at the delta pass (``origin``)."""
        with torch._C.DisableTorchFunction():
            a, b = args
            n = self._n
            for i, (t, other) in enumerate(((a, b), (b, a))):
                entry = self._unbatched.get(id(t)) if isinstance(t, Tensor) else None
                if (entry is None or entry[1] is not t or not isinstance(other, Tensor)
                        or other.dim() < t.dim() or other.dim() == 0 or other.shape[0] != n):
                    continue
                call = entry[0]
                if call.origin is not None or len(call.edges) != 1:
                    continue
                pad = other.dim() - t.dim()
                if pad == 0 and t.shape[0] != 1:
                    continue
                rep = t.reshape((1,) * pad + tuple(t.shape)).expand(n, *([-1] * (other.dim() - 1)))
                x = call.args[0]
                call.args = (x.reshape((1,) * pad + tuple(x.shape)).expand(n, *([-1] * (x.dim() + pad - 1))),
                             ) + tuple(call.args[1:])
                call.origin = call.edges[0]
                call.edges = [get_gradient_edge(rep)]
                del self._unbatched[id(t)]
                return (rep, b) if i == 0 else (a, rep)
        return args

    def _where(self) -> str:
        return _path(self._paths, self._stack[-1][0]) if self._stack else "<outside modules>"

    def _over_examples(self, x) -> bool:
        """Whether a batch-statistics normalization of ``x`` is over the examples: not a
        normalization of a parameter's view (weight standardization, as timm's StdConv2d), and
        the leading dim is the batch."""
        if not isinstance(x, Tensor) or isinstance(x, nn.Parameter):
            return False
        if isinstance(x._base, nn.Parameter):
            return False
        return self._n is None or x.dim() == 0 or x.shape[0] == self._n

    def _batch_stats_norm(self, args, kwargs):
        """F.batch_norm with batch statistics under ``batch_norm=...`` (``curvreg.batchnorm``):
        the normalization through gates, then its affine step recorded as an op call."""
        with torch._C.DisableTorchFunction():  # bookkeeping: keep it out of _UsageMode
            self._bn_inside.update(id(module) for module, _ in self._stack)
            xhat, w, b = batchnorm.normalize(args, kwargs, self._switch)
            self._bn_reach.append(frozenset(self._seen))
            shell = ops.NormalizedAffine(w, b)
            out = shell(xhat)
            names = {k: id(t) for k, t in (("weight", w), ("bias", b))
                     if isinstance(t, Tensor) and id(t) in self._params}
            if names:
                self._seen.update(names.values())
                self._calls.append(_Call(shell, self._where(), (xhat,), None, out, names, True,
                                         op="F.batch_norm (batch statistics)"))
        return out

    def _on_op(self, func, args, kwargs, out):
        used = [a for a in _op_params(args, kwargs) if id(a) in self._params]
        views = {id(t): entry[1] for t in _op_tensors(args, kwargs)
                 for entry in [self._views.get(id(t))] if entry is not None and entry[0] is t}
        if (func in ops.VIEWS and len(used) == 1 and not views and args and args[0] is used[0]
                and isinstance(out, Tensor) and self._stack):
            self._views[id(out)] = (out, used[0], self._stack[-1][0])  # see _post_hook
            return
        used += [p for p in views.values() if all(p is not a for a in used)]
        if not used:
            return
        self._seen.update(id(a) for a in used)
        module = self._stack[-1][0] if self._stack else None
        use = None
        if module is None or type(module) not in self._module_rules:
            use = ops.match(func, args, kwargs, self._params, views)
        if use is not None:  # an op rule covers these parameters (see also _covered)
            with torch._C.DisableTorchFunction():  # bookkeeping: keep it out of _UsageMode
                names = {k: id((use.owners or {}).get(k, use.shell._parameters[k])) for k in use.names}
                self._view_covered.update((id(module), id(p)) for p in (use.owners or {}).values())
                call = _Call(use.shell, self._where(), use.inputs, None, out, names,
                             True, op=use.op, position_wise=use.position_wise)
                for k in (use.owners or {}):
                    self._view_calls.setdefault(id(use.shell._parameters[k]), []).append(call)
                self._calls.append(call)
                if (isinstance(out, Tensor) and self._n is not None and self._n > 1
                        and (out.dim() == 0 or out.shape[0] != self._n)):
                    self._unbatched[id(out)] = (call, out)
            covered = set(names.values())
            used = [a for a in used if id(a) not in covered]
        if used and not any(t.requires_grad for t in _float_tensors(out)):
            return  # no gradient flows through it: p.dtype, p.shape, p.size(), a comparison...
        for a in used:
            self._attribute(module, a, out)

    def _attribute(self, module, a, out):
        """Count parameter ``a``'s use in an op no op rule covers toward ``module``'s call."""
        entry = self._params[id(a)]
        if module is None:
            self._outside.extend((entry[0], t) for t in _float_tensors(out) if t.requires_grad)
            return
        local = self._local.get(id(module))
        if local is None:
            local = {id(p): n for n, p in module.named_parameters()}
            self._local[id(module)] = local
        name = local.get(id(a))
        if name is None:
            raise ValueError(f"module '{_path(self._paths, module)}' uses parameter "
                             f"'{entry[0]}', which belongs to neither it nor its children; "
                             "per-example gradients of that use cannot be attributed. "
                             "Move the parameter into the module that uses it.")
        self._stack[-1][1][name] = id(a)

    # ----------------------------------------------------------------- computing
    def per_example_sq_grad_norms(self, losses: Tensor, *, create_graph: bool = True) -> Tensor:
        """Per-example (or per-group) squared gradient norms of ``losses``.

        Args:
            losses: ``[N]``, one loss per example (``reduction="none"``), from the taped forward.
            create_graph: keep the result differentiable (default). ``False`` returns the same
                values detached, at lower cost.

        Returns:
            ``[N // group_size]`` tensor; entry k is ||d/dtheta mean_{i in group k} l_i||^2
            (so ||g_i||^2 for group_size 1). Not scaled by 1/N. An empty batch gives an empty
            result (still connected to ``losses``, so a backward through it is a no-op).
        """
        self._check_losses(losses)
        n, m = losses.shape[0], self.group_size
        if n == 0:
            return losses * 0 if create_graph else losses.detach() * 0
        calls = [c for c in self._calls if c.edges]
        for c in calls:
            c.check_versions()
        # batch_norm="unbiased": the parameters the batch statistics may depend on (those used
        # before the last statistics) are probed through the true graph, alone (bn_estimator
        # "probe": calls with only such parameters need no delta) or around their exact frozen
        # norms ("control_variate"); see curvreg.batchnorm
        reach = set().union(*self._bn_reach) if self.batch_norm == "unbiased" else set()
        exclude = reach if self.bn_estimator == "probe" else set()
        probed = [c for c in calls if exclude and all(key in exclude for key in c.keys)]
        calls = [c for c in calls if c not in probed]
        if not (calls or self._outside or reach):
            raise ValueError("nothing to differentiate: the taped forward used no trainable "
                             "parameter; run the model's forward inside `with tape:`")
        live = self._deltas(losses, calls, n, create_graph) if (calls or self._outside) else []
        if not live and not reach:
            raise ValueError("losses was not produced from the taped forward: it does not depend "
                             "on any recorded module output")
        # mixed precision: the rules' arithmetic (squares and sums over positions) runs in
        # float32 on inputs and deltas promoted from bf16/fp16, outside autocast
        with torch.set_grad_enabled(create_graph), torch.autocast(losses.device.type, enabled=False):
            total = self._accumulate(live, n, exclude) if live else None
        if reach:
            est = self._bn_probe(losses, live, reach, n, create_graph)
            total = est if total is None else total + est
            for c in probed:
                kinds = self.methods.get(c.path, "")
                if "probe-bn" not in kinds.split("+"):
                    self.methods[c.path] = f"{kinds}+probe-bn" if kinds else "probe-bn"
        return total / (m * m)

    def _deltas(self, losses: Tensor, calls: List[_Call], n: int, create_graph: bool) -> list:
        """[(call, its output deltas)] for the calls reached by ``losses``, after the checks:
        the delta pass (statistics held constant), parameters used outside modules, broadcast
        position tables, the example dimension and the independence check."""
        expanded = [c for c in calls if c.origin is not None]
        views = [self._views[vid][0] for vid in self._view_calls
                 if vid in self._views and self._views[vid][0].requires_grad]
        outs = ([e for c in calls for e in c.edges] + [t for _, t in self._outside]
                + [c.origin for c in expanded] + views)
        with self._delta_pass():
            deltas = list(torch.autograd.grad(losses.sum(), outs, retain_graph=True,
                                              create_graph=create_graph, allow_unused=True))
        view_deltas = deltas[len(deltas) - len(views):]
        del deltas[len(deltas) - len(views):]
        origin_deltas = deltas[len(deltas) - len(expanded):] if expanded else []
        del deltas[len(deltas) - len(expanded):]
        for (name, _), d in zip(self._outside, deltas[len(deltas) - len(self._outside):]):
            if d is not None:
                raise ValueError(f"parameter '{name}' is used outside the forward of any module "
                                 "of the taped model; wrap that computation in a module")
        per_call = []
        for c in calls:
            per_call.append(deltas[:len(c.edges)])
            del deltas[:len(c.edges)]
        by_call = {id(c): d for c, d in zip(calls, per_call)}
        for c, total in zip(expanded, origin_deltas):
            rep = by_call[id(c)][0]
            if total is None or rep is None or not torch.allclose(
                    rep.detach().sum(0).reshape(total.shape), total.detach(), rtol=1e-6, atol=1e-12):
                raise ValueError(
                    f"the output of {c.where} has no example dimension and is used by an op "
                    "other than the broadcasting sum or product that met it with the batch; "
                    "per-example gradients of that use cannot be separated. Expand it to the "
                    "batch first (e.g. position_ids.expand(N, -1)).")
        self._check_views(views, view_deltas, by_call, n)
        live = [(c, d) for c, d in zip(calls, per_call) if any(x is not None for x in d)]
        if not live:
            return live
        for c, d in live:
            for delta, dim in zip(d, c.dims):
                if delta is not None:
                    _check_leading(c, delta, n, dim)
        self._check_independent(losses, live, n)
        return live

    def _check_views(self, views, view_deltas, by_call, n: int) -> None:
        """A parameter's view consumed by elementwise rules must have no other use: its whole
        gradient must be what those rule calls account for (else the rest would be lost)."""
        for view, total in zip(views, view_deltas):
            if total is None:
                continue
            covered = torch.zeros_like(view)
            for c in self._view_calls[id(view)]:
                d = by_call.get(id(c))
                if d and d[0] is not None:
                    args, delta = _example_view(c, d[0], n)
                    g = self._rule(c).grads(c.module, args, delta, ["weight"], 1)["weight"]
                    covered = covered + g.detach().sum(0).reshape(view.shape)
            tol = 1000 * torch.finfo(total.dtype).eps
            if not torch.allclose(covered, total.detach(), rtol=tol,
                                  atol=tol * float(total.detach().abs().max())):
                param = self._views[id(view)][1]
                raise ValueError(
                    f"parameter '{self._params[id(param)][0]}' is used through a reshaped view "
                    "that an elementwise rule consumes and that is also used elsewhere (another "
                    "op, a module output, or after the forward); per-example gradients of that "
                    "other use cannot be separated. Use the view only in the elementwise op, or "
                    "use the parameter directly.")

    @contextmanager
    def _delta_pass(self):
        """A backward for output gradients only: the fused layers skip their weight products."""
        for h in self._holders:
            h.delta_pass = True
        self._switch.frozen = True  # batch statistics held constant (curvreg.batchnorm)
        try:
            yield
        finally:
            self._switch.frozen = False
            for h in self._holders:
                h.delta_pass = False

    def _check_independent(self, losses: Tensor, live, n: int) -> None:
        """Refuse if example j's loss depends on another example's row of a recorded output.

        The rules read row i of every recorded output's gradient as d l_i / d y_i. That holds
        only if (a) the dimension taken as the example dimension is one, and (b) nothing after
        the output mixes examples (batch statistics, a reduction or indexing over the batch).
        One backward of l_j alone tests both: every other row of its gradient must be exactly
        zero. It runs once per model and recorded structure (``check_independence="once"``).
        """
        if self.check_independence == "never" or n < 2:
            return
        key = (self.model.training, n, tuple((c.path, c.op, tuple(tuple(t.shape) for t in d if t is not None))
                                            for c, d in live))
        seen = _CHECKED.setdefault(self.model, set())
        if self.check_independence == "once" and key in seen:
            return
        j = n // 2
        targets = [(c, e, dim) for c, d in live for e, delta, dim in zip(c.edges, d, c.dims)
                   if delta is not None]
        with self._delta_pass():
            grads = torch.autograd.grad(losses[j], [e for _, e, _ in targets], retain_graph=True,
                                        allow_unused=True)
        for (c, _, dim), g in zip(targets, grads):
            if g is None:
                continue
            rows = g.detach().movedim(dim, 0).reshape(n, -1).abs().sum(1)
            rows[j] = 0
            if bool(rows.any()):
                k = int(rows.nonzero()[0])
                raise ValueError(
                    f"examples are not independent at {c.where}: row {k} of its output (taken as "
                    f"example {k}) changes the loss of example {j}. Either that dimension is not "
                    "the example dimension (positions, or a batch merged with another axis "
                    "example-minor), or the model mixes examples after it (batch statistics, a "
                    "reduction, normalization or indexing over the batch). Per-example gradients "
                    "through it are not separable: keep examples independent along dim 0, or put "
                    "batch-statistics layers in eval mode.")
        seen.add(key)

    def _check_losses(self, losses):
        if not isinstance(losses, Tensor):
            raise TypeError(f"losses must be a Tensor, got {type(losses).__name__}")
        if not losses.is_floating_point():
            raise TypeError(f"losses must have a floating-point dtype, got {losses.dtype}")
        if losses.dim() != 1:
            raise ValueError(f"losses must have shape [N] (one loss per example, e.g. "
                             f"reduction='none'), got shape {tuple(losses.shape)}")
        if not torch.is_grad_enabled():
            raise RuntimeError("per_example_sq_grad_norms was called under torch.no_grad(); "
                               "gradients are needed. Call it outside no_grad (use "
                               "create_graph=False for a cheaper detached value)")
        if not losses.requires_grad:
            raise ValueError("losses does not require grad: it was not produced from the taped "
                             "forward, or the forward ran under no_grad")
        n = losses.shape[0]
        if self._n is not None and n != self._n:
            raise ValueError(f"losses has {n} entries but the taped forward had batch size "
                             f"{self._n}")
        if n % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide the batch size {n}")

    def _rule(self, c: _Call) -> Optional[LayerRule]:
        """The rule for a call: op calls by shell type, module calls only by a user rule."""
        if c.op is None and type(c.module) not in self._module_rules:
            return None
        return self.rules.get(type(c.module))

    def _plan(self, live, exclude: set) -> List[tuple]:
        """Per live call: (names computed exactly, names probed), without the ``exclude`` keys."""
        if self.estimator == "exact":
            plan = [(c.names, []) for c, _ in live]
        elif self.estimator == "probe":
            plan = [([], c.names) for c, _ in live]
        else:
            ok = [self._rule(c) is not None and hybrid_exact(c.module, c.args)
                  and (d[0] is None or d[0].shape[0] == self._n) for c, d in live]
            probed = {key for (c, _), good in zip(live, ok) if not good for key in c.keys}
            plan = [([k for k, key in zip(c.names, c.keys) if key not in probed],
                     [k for k, key in zip(c.names, c.keys) if key in probed]) for c, _ in live]
        if not exclude:
            return plan
        keep = lambda c, names: [k for k, key in zip(c.names, c.keys)  # noqa: E731
                                 if k in names and key not in exclude]
        return [(keep(c, ex), keep(c, pr)) for (c, _), (ex, pr) in zip(live, plan)]

    def _accumulate(self, live, n: int, exclude: set) -> Optional[Tensor]:
        plan = self._plan(live, exclude)
        methods: Dict[str, List[str]] = {}
        for (c, _), (exact, probed) in zip(live, plan):
            kinds = methods.setdefault(c.path, [])
            fallback = exact and self._rule(c) is None
            reach = [k for k, key in zip(c.names, c.keys) if key in exclude]
            for kind, names in (("fallback" if fallback else "exact", exact), ("probe", probed),
                                ("probe-bn", reach)):
                if names and kind not in kinds:
                    kinds.append(kind)
        self.methods = {path: "+".join(kinds) for path, kinds in methods.items()}
        total = self._exact(live, plan, n)
        est = self._probe(live, plan, n)
        if est is not None:
            total = est if total is None else total + est
        return total

    def _exact(self, live, plan, n: int) -> Optional[Tensor]:
        m = self.group_size
        owners = Counter(key for (c, _), (names, _) in zip(live, plan)
                         for k, key in zip(c.names, c.keys) if k in names)
        total, shared, fallbacks = None, {}, []
        for (c, d), (names, _) in zip(live, plan):
            if not names:
                continue
            keys = [key for k, key in zip(c.names, c.keys) if k in names]
            single = [k for k, key in zip(names, keys) if owners[key] == 1]
            multi = [k for k, key in zip(names, keys) if owners[key] > 1]
            rule = self._rule(c)
            if rule is not None and len(d) == 1 and all(k in c.module._parameters for k in names):
                args, delta = _promote(*_example_view(c, d[0], n))
                if single:
                    sq = (rule.sq_norms or _sq_via_grads(rule))(c.module, args, delta, single, m)
                    total = sq if total is None else total + sq
                grads = rule.grads(c.module, args, delta, multi, m) if multi else {}
            else:
                fallbacks.append(c.where)
                grads = fallback_grads(c, d, names, m, n, self._covered)
                single_grads = {k: v for k, v in grads.items() if k in single}
                if single_grads:
                    sq = sq_from_grads(single_grads)
                    total = sq if total is None else total + sq
                grads = {k: v for k, v in grads.items() if k not in single}
            for k, key in zip(names, keys):
                if k in grads:
                    g = grads[k].reshape(grads[k].shape[0], -1)  # views share a parameter's key
                    shared[key] = g if key not in shared else shared[key] + g
        if shared:
            sq = sq_from_grads(shared)
            total = sq if total is None else total + sq
        if fallbacks:
            warnings.warn("curvreg: no exact rule for these uses of parameters; using the "
                          "per-example loop fallback (slower): " + ", ".join(sorted(set(fallbacks))),
                          FallbackWarning, stacklevel=4)
        return total

    def _covered(self, func, args, kwargs) -> set:
        """ids of the parameters an op rule covers in this call (for the fallback's re-run)."""
        try:
            use = ops.match(func, args, kwargs, self._params)
        except ops.BatchStatistics:
            return set()
        return set() if use is None else {id(use.shell._parameters[k]) for k in use.names}

    def _probe(self, live, plan, n: int) -> Optional[Tensor]:
        """(1/K) sum_k (g_group . v_k)^2 over the probed parameters (see ``curvreg.probe``)."""
        work = [(c, d, names) for (c, d), (_, names) in zip(live, plan) if names]
        if not work:
            return None
        keys = {key for c, _, names in work for k, key in zip(c.names, c.keys) if k in names}
        order = [key for key in self._params if key in keys]  # model order: reproducible draws
        est = None
        for _ in range(self.num_probes):
            vs = {key: draw(self._params[key][1], self.distribution, self.generator) for key in order}
            g = self._group_sum(self._probe_dot(work, vs, n))
            est = g * g if est is None else est + g * g
        return est / self.num_probes

    def _group_sum(self, t: Tensor) -> Tensor:
        return t.view(-1, self.group_size).sum(1)

    @staticmethod
    def _probe_dot(work, vs, n: int) -> Optional[Tensor]:
        """Per example, g_i . v over the parameters named in ``work`` ((call, deltas, names))."""
        dot = None
        for c, d, names in work:
            local = {k: vs[key] for k, key in zip(c.names, c.keys) if k in names}
            tangents = local_tangents(c, names, local)
            for t, delta, dim in zip(tangents, d, c.dims):
                if delta is None:
                    continue
                part = (_promote_one(delta) * _promote_one(t)).movedim(dim, 0).reshape(n, -1).sum(1)
                dot = part if dot is None else dot + part
        return dot

    def _bn_probe(self, losses: Tensor, live, reach: set, n: int, create_graph: bool) -> Tensor:
        """The probed part of ``batch_norm="unbiased"``, per group, over the parameters ``reach``:
        (1/K) sum_k (G_k . v_k)^2 (``bn_estimator="probe"``) or (1/K) sum_k [(G_k . v_k)^2 -
        (U_k . v_k)^2] (``"control_variate"``), where G_k . v is a directional derivative of
        the loss vector through the true graph, statistics included: with a dummy w,
        a = J^T w (one backward, graph kept) and J v = d <a, v> / dw (double backward)."""
        order = [key for key in self._params if key in reach]
        w = torch.zeros_like(losses, requires_grad=True)
        a = torch.autograd.grad(losses, [self._params[key][1] for key in order], w,
                                create_graph=True, allow_unused=True)
        used = [(key, t) for key, t in zip(order, a) if t is not None]
        cv = self.bn_estimator == "control_variate"
        work = [(c, d, [k for k, key in zip(c.names, c.keys) if key in reach]) for c, d in live]
        work = [item for item in work if cv and item[2]]
        est = torch.zeros(n // self.group_size, dtype=losses.dtype, device=losses.device)
        for _ in range(self.num_probes):
            vs = {key: draw(self._params[key][1], self.distribution, self.generator) for key in order}
            dense = {key: v.dense() if isinstance(v, KronProbe) else v for key, v in vs.items()}
            if used:
                proj = sum((t * dense[key]).sum() for key, t in used)
                g = self._group_sum(torch.autograd.grad(proj, w, create_graph=create_graph,
                                                        retain_graph=True)[0])
                est = est + g * g
            u = self._probe_dot(work, vs, n) if work else None
            if u is not None:
                u = self._group_sum(u)
                est = est - u * u
        est = est / self.num_probes
        return est if create_graph else est.detach()


_CHECKS = ("once", "always", "never")
# ops at which an unbatched rule-op output is expanded to the batch (GradNormTape._broadcast)
_BROADCASTING = frozenset({torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__,
                           Tensor.add_, torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__})
# model -> recorded structures already checked for independence (see _check_independent)
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def _example_dims(module: nn.Module, outputs: List[Tensor]) -> List[int]:
    """The example dimension of each recorded output: 0, except for sequence-first layers."""
    if isinstance(module, nn.RNNBase):  # output [T, N, H] unless batch_first; h_n, c_n [L, N, H]
        return [0 if (i == 0 and module.batch_first) else 1 for i in range(len(outputs))]
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return [1 if t.dim() == 3 else 0 for t in outputs]  # attention weights are [N, T, S]
    return [0] * len(outputs)


def _example_view(c: _Call, delta: Tensor, n: Optional[int]):
    """(inputs, delta) with the example dimension first and unmerged, as the rules read them.

    A position-wise op whose leading dim is k * N (examples merged with positions, example-major)
    is viewed as [N, k, ...]; the independence check verifies that reading."""
    if not c.position_wise or n is None or delta.shape[0] == n:
        return c.args, delta
    k = delta.shape[0] // n
    x = c.args[0]
    return ((x.reshape(n, k, *x.shape[1:]),) + tuple(c.args[1:]),
            delta.reshape(n, k, *delta.shape[1:]))


_LOW = (torch.bfloat16, torch.float16)


def _promote_one(t):
    return t.float() if isinstance(t, Tensor) and t.dtype in _LOW else t


def _promote(args: tuple, delta: Tensor):
    """(args, delta) with bf16/fp16 tensors as float32 (the mixed-precision policy)."""
    return tuple(_promote_one(a) for a in args), _promote_one(delta)


def _op_tensors(args, kwargs):
    """Plain (non-Parameter) tensors among an op's arguments, one level into lists/tuples."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor) and not isinstance(a, nn.Parameter):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (b for b in a if isinstance(b, Tensor) and not isinstance(b, nn.Parameter))


def _op_params(args, kwargs):
    """Parameters among an op's arguments (one level into lists/tuples, as torch ops take)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, nn.Parameter):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (b for b in a if isinstance(b, nn.Parameter))


def _check_leading(c: _Call, delta: Tensor, n: int, dim: int = 0) -> None:
    size = delta.shape[dim] if delta.dim() > dim else None
    if size == n or (c.position_wise and size and size % n == 0):
        return
    merged = " (a position-wise op may merge examples with positions, example-major)" if c.position_wise else ""
    raise ValueError(f"{c.where} produced an output with dim {dim} of size {size}, not the batch "
                     f"size {n}; keep the example dimension first and unmerged{merged}. A "
                     "parameter used without an example dimension (a position table looked up "
                     "with shape [1, T] ids) must be broadcast to the batch before its rule op.")


def _sq_via_grads(rule: LayerRule):
    return lambda *a: sq_from_grads(rule.grads(*a))


def _mixing_message(path: str, kind: str, reason: str) -> str:
    return (f"module '{path}' ({kind}) {reason}. Pass GradNormTape(..., batch_norm='unbiased') "
            "for an unbiased estimate of the true per-example norms (statistics coupling "
            "included), or batch_norm='frozen' for the exact norms with this batch's statistics "
            "held constant (a different quantity); or put the BatchNorm in eval mode "
            "(module.eval()), or use GroupNorm/LayerNorm.")
