"""The tape's record of a forward: which op or module call used which trainable parameter.

``Recording.start()`` registers forward hooks on the modules that hold trainable parameters and
enters a ``TorchFunctionMode`` that sees every torch op. Each op that a rule covers
(``curvreg.ops``: F.linear, convolutions, embedding, norms, elementwise scale/shift) becomes a
``Call`` of a small shell module, whatever module makes it; other parameter uses are counted
toward the innermost module call (the exact per-example loop takes them). Along the way it
refuses what it cannot take: batch statistics that mix examples, ops without a second
derivative, parameters used by a module they do not belong to. ``stop()`` removes everything.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from . import (attention, batchnorm, derived, fused, ops, shared_forward, taped_conv, taped_gelu,
               unbatched)
from .probe import LINEAR_IN_PARAMS
from .rules import std_conv


class Call:
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
                 "names", "keys", "op", "position_wise", "dims", "origin", "kept", "chain_names")

    def __init__(self, module, path, args, kwargs, output, used: Dict[str, int], by_rule: bool,
                 op: Optional[str] = None, position_wise: bool = False, keep_output: bool = False,
                 chain_names: frozenset = frozenset()):
        self.module, self.path, self.args, self.kwargs = module, path, args, kwargs
        # names used only by ops of functions of parameters alone (curvreg.unbatched)
        self.chain_names = chain_names
        self.op, self.position_wise = op, position_wise  # op: set for op-level calls (curvreg.ops)
        self.origin = None  # for an output expanded to the batch: the edge of the unexpanded one
        floats = _float_tensors(output)
        self.index = [i for i, t in enumerate(floats) if t.requires_grad]  # recorded outputs
        self.edges = [get_gradient_edge(floats[i]) for i in self.index]
        # ``by_rule``: a rule (or a closed-form probe tangent) will handle this module, which
        # also needs one output and the module's own parameters (see ``curvreg.exact``).
        by_rule = by_rule and len(self.index) == 1 and all(k in module._parameters for k in used)
        self.outputs = None if by_rule else [floats[i] for i in self.index]
        # ``keep_output``: the rule may read the output (``LayerRule.with_output``); ``output``
        # gives it, or None once it was modified in place (the rule then recomputes it)
        self.kept = (floats[self.index[0]], floats[self.index[0]]._version) \
            if by_rule and keep_output else None
        self.names = sorted(used)                 # parameter names relative to ``module``
        self.keys = [used[k] for k in self.names]  # id() of each parameter
        self.versions = [t._version for t in self._tensors()]
        self.dims = _example_dims(module, [floats[i] for i in self.index])

    @property
    def output(self) -> Optional[Tensor]:
        """The kept output of a rule that reads it, if not modified in place since."""
        if self.kept is None or self.kept[0]._version != self.kept[1]:
            return None
        return self.kept[0]

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

    def __init__(self, rec: "Recording"):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.rec
        if not rec.recording:
            return func(*args, **kwargs)
        rec.funcs.add(func)
        shared = rec.shared if rec.shared is not None and rec.shared.active else None
        refused = ops.NO_DOUBLE_BACKWARD.get(func)
        if refused is not None and _needs_grad(args, kwargs):
            raise ValueError(f"{refused[0]} in module '{rec._where()}' has no second derivative "
                             "in PyTorch, so a penalty on gradients through it cannot be trained. "
                             f"Use {refused[1]} instead.")
        if (func is F.batch_norm and batchnorm.uses_batch_stats(args, kwargs)
                and rec._over_examples(args[0] if args else kwargs.get("input"))):
            if rec.batch_norm:
                return rec._batch_stats_norm(args, kwargs)
            if _needs_grad(args, kwargs):
                raise ValueError(_mixing_message(
                    rec._where(), "F.batch_norm", "normalizes with the statistics of the batch, so "
                    "each loss depends on the other examples"))
        if func is F.multi_head_attention_forward:
            thunk = attention.decompose(args, kwargs)
            if thunk is not None:
                with self:  # re-enter: the projections inside are recorded as rule ops
                    return thunk()
        if rec.unbatched:  # outputs without an example dimension meeting the batch
            if func is F.linear and (thunk := rec.unbatched.linear_bias(args, kwargs)) is not None:
                with self:  # re-enter: the linear and the sum are recorded
                    return thunk()
            if func in unbatched.BROADCASTING and len(args) == 2:
                args = rec.unbatched.broadcast(args, rec.n)
            # batched products broadcast their leading dims the same way (DeBERTa's
            # ``query @ pos_key.transpose(-1, -2)`` with pos_key [1, heads, 2k, d])
            elif func in ops.MATMULS and len(args) == 2 and not kwargs:
                args = rec.unbatched.broadcast(args, rec.n, matmul=True)
            elif func is torch.einsum:
                args = rec.unbatched.einsum(args, kwargs, rec.n)
            elif func is F.scaled_dot_product_attention:
                args, kwargs = rec.unbatched.batched_mask(args, kwargs, rec.n)
            elif (func in unbatched.TILING
                  and (rep := rec.unbatched.tile(func, args, kwargs, rec.n)) is not None):
                return rep.contiguous() if func is Tensor.repeat else rep
        if func in ops.ADDCMUL and (thunk := ops.addcmul_parts(args, kwargs, rec.tracked)):
            with self:  # re-enter: the product and the sum are recorded as rule ops
                return thunk()
        if rec.derived:  # x @ W.T as F.linear; a bias joined by torch.cat piece by piece
            if func in ops.MATMULS and (linear := rec.derived.as_linear(args, kwargs)):
                func, args, kwargs = F.linear, linear, {}
            if (func is F.linear or func in derived.SUMS) and (
                    thunk := rec.derived.joined(func, args, kwargs)) is not None:
                with self:  # re-enter: the linear and the sums inside are recorded as rule ops
                    return thunk()
        conv = taped_conv.conv_args(func, args, kwargs)
        if shared is not None:  # forward mode: the plain op, on the probed parameters' duals
            with torch._C.DisableTorchFunction():
                out = shared.conv(conv) if conv is not None else None
            if out is None:
                call_args, call_kwargs = shared.substitute(func, args, kwargs)
                if func is F.batch_norm and shared.valid:  # see batchnorm.explicit
                    with torch._C.DisableTorchFunction():
                        out = batchnorm.explicit(call_args, call_kwargs, update=True)
                else:
                    out = func(*call_args, **call_kwargs)
        elif (func in _FUSABLE and not (rec.unbatched and rec.unbatched.holds(args))
              and (dense := fused.fusable(func, args, kwargs, rec.params, rec.fuse_linear))):
            holder = fused.Holder()
            rec.holders.append(holder)
            out = fused.TapedLinear.apply(*dense[:3], holder, dense[3])
        elif conv is not None and (id(conv.weight) in rec.params or rec._standardized(conv)):
            out = taped_conv.TapedConv.apply(conv.x, conv.weight, conv.bias, conv.nd, conv.stride,
                                             conv.padding, conv.dilation, conv.groups, rec.switch)
        elif func is F.gelu and (gelu := taped_gelu.gelu_input(args, kwargs)) is not None:
            out = taped_gelu.TapedGelu.apply(*gelu)
        else:
            out = func(*args, **kwargs)
        out = batchnorm.one_example_layout(func, args, kwargs, out)
        rec.taint(args, kwargs, out)
        if func in unbatched.VIEW_CHAIN and rec.unbatched:
            rec.unbatched.follow(func, args, kwargs, out, rec.n)
        rec._on_op(func, args, kwargs, out)
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


def _example_dims(module: nn.Module, outputs: List[Tensor]) -> List[int]:
    """The example dimension of each recorded output: 0, except for sequence-first layers."""
    if isinstance(module, nn.RNNBase):  # output [T, N, H] unless batch_first; h_n, c_n [L, N, H]
        return [0 if (i == 0 and module.batch_first) else 1 for i in range(len(outputs))]
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return [1 if t.dim() == 3 else 0 for t in outputs]  # attention weights are [N, T, S]
    return [0] * len(outputs)


# dense ops that may take the fused weight-gradient path (curvreg.fused)
_FUSABLE = frozenset({F.linear, torch.addmm})


class Recording:
    """The calls of one taped forward, with what the tape's options say about them.

    Args:
        model: the taped module.
        batch_norm: the tape's ``batch_norm`` option (None refuses batch statistics).
        module_rules: module types whose calls a module rule takes whole (the user's, and
            the built-in weight-standardized convolutions').
        output_rules: those of them whose rule reads the call's output.
        estimator: the tape's estimator (a user module rule needs the exact one, or a module
            linear in its parameters).
        fuse_linear: the ``curvreg.fused`` policy.
        switch: the ``batchnorm.Switch`` that holds batch statistics constant in the delta pass.
        shared: for a tape that may run the forward in forward mode (``curvreg.shared_forward``):
            called at the model's first call with its ``signature``, returns a ``SharedForward``
            or None.
    """

    def __init__(self, model: nn.Module, *, batch_norm: Optional[str], module_rules: frozenset,
                 estimator: str, fuse_linear, switch: "batchnorm.Switch",
                 output_rules: frozenset = frozenset(),
                 shared: Optional[Callable[[tuple], Optional["shared_forward.SharedForward"]]] = None):
        self.model, self.batch_norm, self.module_rules = model, batch_norm, module_rules
        self.output_rules = output_rules
        self.estimator, self.fuse_linear, self.switch = estimator, fuse_linear, switch
        self.shared_source = shared
        self.params: Dict[int, tuple] = {}
        self.paths: Dict[int, str] = {}
        self._handles: list = []
        self._patched: List[nn.Module] = []  # modules whose forward runs as F.gelu while recording
        self._mode: Optional[_UsageMode] = None
        self.recording = False
        self.reset()

    def reset(self):
        self.calls: List[Call] = []
        self.outside: List[tuple] = []  # (param name, op output) for uses outside any module
        self._stack: List[list] = []
        self.holders: List[fused.Holder] = []  # one per fused dense call
        self.n: Optional[int] = None
        # rule-op outputs without an example dim (position tables looked up with [1, T] ids)
        # until they meet the batch (curvreg.unbatched)
        self.unbatched = unbatched.Unbatched(self.params)
        self.unbatched.meet = self._meet
        self.bn_reach: List[frozenset] = []  # per batch-statistics normalization: the ids of
        # the parameters used before it (see curvreg.batchnorm)
        self._seen: set = set()       # ids of the parameters used so far in the forward
        self._bn_inside: set = set()  # ids of the module calls that ran such a normalization
        # id of a view of a parameter (ops.passes_gradient) -> (view, Parameter, module that made
        # it): consumed by an elementwise rule as the parameter itself, otherwise a use of the
        # parameter (see _on_op, _post_hook and the view check in _deltas)
        self.views: Dict[int, tuple] = {}
        # W.T and torch.cat of biases: consumed by a rewrite, or ordinary uses (curvreg.derived)
        self.derived = derived.DerivedUses(self.params)
        self.view_calls: Dict[int, list] = {}  # view id -> the rule calls that consumed it
        self.view_parents: Dict[int, Tensor] = {}  # view id -> the view it was made from
        self._view_covered: set = set()  # (id(module), id(param)) of rule-covered view uses
        self.root: Optional[tuple] = None  # (args, kwargs, output) of the model's last call
        # tensors without gradient made from the model's inputs or from tensors with one (token
        # ids, masks of activations): not constants of the model (see _batch_free). By id, with
        # a weak reference so that a freed tensor's id, reused by a constant, does not count
        self.tainted: Dict[int, weakref.ref] = {}
        # (parameter id, refusal) for uses by a module not owning it inside a function of
        # parameters alone: refused by settle_chains unless the function is taken
        self._foreign: List[tuple] = []
        self.funcs: set = set()  # every torch function the forward called (curvreg.probe)
        self.root_calls = 0  # how often the model was called
        self.signature: Optional[tuple] = None  # of its first call, for a shared forward
        self.shared: Optional[shared_forward.SharedForward] = None  # that call's, if in forward mode

    def start(self) -> None:
        """Check the model's modules, register the hooks and enter the op mode."""
        self.params = {id(p): (n, p) for n, p in self.model.named_parameters() if p.requires_grad}
        self.paths = {id(m): p for p, m in self.model.named_modules()}
        for path, module in self.model.named_modules():
            reason = _mixing_reason(module, self.batch_norm)
            if reason:
                raise ValueError(_mixing_message(path or "<root>", type(module).__name__, reason))
        self.reset()
        self._local: Dict[int, Dict[int, str]] = {}
        try:
            for module in self._modules_with_params():
                self._handles.append(module.register_forward_pre_hook(self._pre_hook,
                                                                      with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._post_hook, with_kwargs=True))
            # The fused attention kernels have no double backward; the math kernel computes the
            # same function with differentiable ops (nested calls included).
            self._sdpa = sdpa_kernel(SDPBackend.MATH)
            self._sdpa.__enter__()
            # tanh GELUs written in Python arithmetic run as F.gelu (curvreg.taped_gelu)
            self._patched = [m for m in self.model.modules() if taped_gelu.computes_tanh_gelu(m)]
            for m in self._patched:
                m.forward = taped_gelu.tanh_gelu
            self._mode = _UsageMode(self)
            self._mode.__enter__()
        except BaseException:
            self._remove()
            raise
        self.recording = True

    def stop(self, *exc) -> None:
        """Leave the op mode and remove the hooks (also after an exception)."""
        self.recording = False
        if self.shared is not None:
            self.shared.close()
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._sdpa.__exit__(*exc)
        self.unbatched.meet = None  # no meetings after the forward; and no reference cycle
        self._remove()

    def _modules_with_params(self):
        """Modules whose subtree holds a trainable parameter (only these can use one)."""
        for module in self.model.modules():
            if module is self.model or any(id(p) in self.params for p in module.parameters()):
                yield module

    def _remove(self):
        for h in self._handles:
            h.remove()
        for m in self._patched:
            m.__dict__.pop("forward", None)
        self._patched = []
        self._handles, self._mode, self._stack = [], None, []

    def _pre_hook(self, module, args, kwargs):
        if not self.recording:
            return
        with torch._C.DisableTorchFunction():  # bookkeeping: keep it out of _UsageMode
            self._enter_call(module, args, kwargs)

    def _enter_call(self, module, args, kwargs):
        reason = _mixing_reason(module, self.batch_norm)
        if reason:
            raise ValueError(_mixing_message(_path(self.paths, module), type(module).__name__, reason))
        if module is self.model:
            self._check_batch(args)
            self._enter_root(args)
            self._taint(t for t in _flat((args, kwargs)) if isinstance(t, Tensor))
        self._stack.append([module, {}, set()])  # module, names used, names used by chains only

    def _enter_root(self, args):
        self.root_calls += 1
        if self.shared is not None:  # a second call: its output is not the one probed
            self.shared.valid = False
        elif self.shared_source is not None and self.root_calls == 1:
            self.signature = shared_forward.signature(self.model, args)
            self.shared = self.shared_source(self.signature)
            if self.shared is not None:
                self.shared.enter()

    def _check_batch(self, args):
        first = next((t for t in _flat(args) if isinstance(t, Tensor) and t.dim()), None)
        if first is None:
            return
        n = first.shape[0]
        if self.n is not None and n != self.n:
            raise ValueError(f"the model's forward ran twice inside one tape with different batch "
                             f"sizes ({self.n}, then {n}); use one tape per forward pass")
        self.n = n

    def _post_hook(self, module, args, kwargs, output):
        if not self.recording or not self._stack or self._stack[-1][0] is not module:
            return
        if module is self.model:
            self.root = (args, kwargs, output)
            if self.shared is not None:
                with torch._C.DisableTorchFunction():
                    self.shared.finish(output)
        with torch._C.DisableTorchFunction():
            for vid, (view, param, maker) in list(self.views.items()):
                if maker is module and vid not in self.view_calls:
                    # no rule consumed this view: the view op was an ordinary use by ``module``
                    self._attribute(module, param, view)
                    del self.views[vid]
        if module is self.model and self.unbatched:
            self.unbatched.spoil(_flat(output))  # such tensors leave the model
        _, used, chain_only = self._stack.pop()
        if used:
            with torch._C.DisableTorchFunction():  # bookkeeping: keep it out of _UsageMode
                self._record(module, args, kwargs, output, used, frozenset(chain_only))

    def _record(self, module, args, kwargs, output, used, chain_only=frozenset()):
        # A module rule (passed by the user) or a closed-form probe tangent needs no outputs; the
        # fallback and the probes' generic jvp re-run the module and compare with them.
        by_rule = type(module) in self.module_rules and (self.estimator == "exact"
                                                          or type(module) in LINEAR_IN_PARAMS)
        if not by_rule and any((id(module), key) in self._view_covered for key in used.values()):
            raise ValueError(
                f"module '{_path(self.paths, module)}' ({type(module).__name__}) uses a parameter "
                "both through a reshaped view consumed by an elementwise rule and in an op no "
                "rule covers; the per-example loop cannot separate the two. Use the parameter "
                "in one form (e.g. store it in the shape it is applied in).")
        if not by_rule and id(module) in self._bn_inside:
            raise ValueError(
                f"module '{_path(self.paths, module)}' ({type(module).__name__}) uses parameters "
                "without an exact rule and normalizes with batch statistics inside its forward; "
                "the per-example loop cannot re-run it one example at a time. Give it a rule "
                "(GradNormTape(rules=...)), or put its BatchNorm in eval mode.")
        self.calls.append(Call(module, _path(self.paths, module), args, kwargs, output,
                               used, by_rule, keep_output=type(module) in self.output_rules,
                               chain_names=chain_only))

    def _standardized(self, conv) -> bool:
        """A convolution inside a weight-standardized convolution module (its weight is a
        function of that module's own weight alone, so the delta pass needs no gradient
        through it): taken by ``TapedConv`` too."""
        module = self._stack[-1][0] if self._stack else None
        return (module is not None and conv.weight.requires_grad
                and std_conv.is_std_conv(module) and type(module) in self.module_rules)

    def _where(self) -> str:
        return _path(self.paths, self._stack[-1][0]) if self._stack else "<outside modules>"

    def _over_examples(self, x) -> bool:
        """Whether a batch-statistics normalization of ``x`` is over the examples: not a
        normalization of a parameter's view (weight standardization, as timm's StdConv2d), and
        the leading dim is the batch."""
        if not isinstance(x, Tensor) or isinstance(x, nn.Parameter):
            return False
        if isinstance(x._base, nn.Parameter):
            return False
        return self.n is None or x.dim() == 0 or x.shape[0] == self.n

    def _batch_stats_norm(self, args, kwargs):
        """F.batch_norm with batch statistics under ``batch_norm=...`` (``curvreg.batchnorm``):
        the normalization through gates, then its affine step recorded as an op call."""
        with torch._C.DisableTorchFunction():  # bookkeeping: keep it out of _UsageMode
            self._bn_inside.update(id(frame[0]) for frame in self._stack)
            norm, w, b = batchnorm.normalize(args, kwargs, self.switch)
            xhat = norm.xhat
            self.bn_reach.append(frozenset(self._seen))
            shell = ops.NormalizedAffine(w, b)
            shared = self.shared if self.shared is not None and self.shared.active else None
            if shared is None:
                out = shell(xhat)
            elif norm.tangent is None:  # forward mode through the affine step's ops
                out = batchnorm.affine(xhat, shared.get(w), shared.get(b))
            else:
                out = batchnorm.shared_affine(norm, w, b, shared.get(w), shared.get(b))
            names = {k: id(t) for k, t in (("weight", w), ("bias", b))
                     if isinstance(t, Tensor) and id(t) in self.params}
            if names:
                self._seen.update(names.values())
                self.calls.append(Call(shell, self._where(), (xhat,), None, out, names, True,
                                       op="F.batch_norm (batch statistics)"))
        return out

    def tracked(self, t) -> bool:
        """Whether t is a parameter the tape tracks or a recorded view of one."""
        if not isinstance(t, Tensor):
            return False
        if isinstance(t, nn.Parameter):
            return id(t) in self.params
        entry = self.views.get(id(t))
        return entry is not None and entry[0] is t

    def taint(self, args, kwargs, out) -> None:
        """Outputs without gradient of an op on the model's inputs or on tensors with one are
        not constants of the model."""
        outs = [t for t in _flat(out) if isinstance(t, Tensor) and not t.requires_grad]
        if outs and any(isinstance(t, Tensor) and (t.requires_grad or self._tainted(t))
                        for t in _flat((args, kwargs))):
            self._taint(outs)

    def _taint(self, tensors) -> None:
        self.tainted.update((id(t), weakref.ref(t)) for t in tensors)

    def _tainted(self, t: Tensor) -> bool:
        ref = self.tainted.get(id(t))
        return ref is not None and ref() is t

    def _batch_free(self, args, kwargs) -> bool:
        """Whether an op's data inputs are constants of the model (made without its inputs:
        T5's relative position buckets, ``torch.arange(T)``), so that its output has no example
        dimension whatever its leading size (T = N). A wrong answer cannot give a wrong value:
        an output taken as unbatched is expanded only where it meets the batch, and the
        expansion is checked (origin and independence checks); otherwise it stays as it was."""
        data = list(ops.op_args(args, kwargs, parameters=False))
        return bool(data) and not any(t.requires_grad or self._tainted(t) for t in data)

    def _view_source(self, func, args, kwargs, used, views, out) -> Optional[nn.Parameter]:
        """The parameter whose view ``out`` is (``ops.passes_gradient`` applied to the parameter,
        or to a recorded view of it: Gemma's ``1 + weight.float()``), else None."""
        if not args or not self._stack or not isinstance(out, Tensor) or len(used) + len(views) != 1:
            return None
        param = used[0] if used else views.get(id(args[0]))
        if param is None or (used and args[0] is not param):
            return None
        return param if ops.passes_gradient(func, args, kwargs) else None

    def _on_op(self, func, args, kwargs, out):
        used = [a for a in ops.op_args(args, kwargs, parameters=True) if id(a) in self.params]
        views = {id(t): entry[1] for t in ops.op_args(args, kwargs, parameters=False)
                 for entry in [self.views.get(id(t))] if entry is not None and entry[0] is t}
        if args and out is args[0] and (used or views):
            if func in ops.CASTS:
                return  # a cast to the dtype it has: the tensor itself
            if views:
                raise ValueError(
                    f"module '{self._where()}' modifies a view of parameter "
                    f"'{self.params[id(next(iter(views.values())))][0]}' in place "
                    f"({torch.overrides.resolve_name(func) or func}); the elementwise rules take "
                    "such a view as the parameter itself. Use an out-of-place op.")
        source = self._view_source(func, args, kwargs, used, views, out)
        if source is not None:  # see _post_hook
            self.views[id(out)] = (out, source, self._stack[-1][0])
            if not used:
                self.view_parents[id(out)] = args[0]
            self.unbatched.spoil(ops.op_args(args, kwargs, parameters=False))
            return
        if (not views and not (self._stack and type(self._stack[-1][0]) in self.module_rules)
                and self.derived.record(func, args, kwargs, used, out)):
            return
        if self.derived:  # another use of W.T or of a join: its parameters', by this module
            used += [p for p in self.derived.other_uses(args, kwargs) if all(p is not a for a in used)]
        used += [p for p in views.values() if all(p is not a for a in used)]
        module = self._stack[-1][0] if self._stack else None
        ruled = module is None or type(module) not in self.module_rules
        # p.expand(...) starts a function of parameters alone although a rule covers it: whether
        # its leading dim is the batch (a class token joined to the tokens) or positions (added
        # to them, T = N included) is known where it meets the batch; unmet, the rule call stands
        rule_alone = lambda: (ruled and func is not Tensor.expand  # noqa: E731
                              and ops.match(func, args, kwargs, self.params) is not None)
        chain = (bool(used) or bool(self.unbatched)) and self.unbatched.chain(
            args, kwargs, used, rule_alone, func in unbatched.VIEW_CHAIN, out)
        if not used:
            return
        self._seen.update(id(a) for a in used)
        use = None
        if ruled:
            use = ops.match(func, args, kwargs, self.params, views)
        if use is not None:  # an op rule covers these parameters (see also covered)
            with torch._C.DisableTorchFunction():  # bookkeeping: keep it out of _UsageMode
                names = {k: id((use.owners or {}).get(k, use.shell._parameters[k])) for k in use.names}
                self._view_covered.update((id(module), id(p)) for p in (use.owners or {}).values())
                call = Call(use.shell, self._where(), use.inputs, None, out, names,
                            True, op=use.op, position_wise=use.position_wise)
                for k in (use.owners or {}):
                    view = use.shell._parameters[k]
                    while view is not None:  # the view and the views it was made from
                        self.view_calls.setdefault(id(view), []).append(call)
                        view = self.view_parents.get(id(view))
                self.calls.append(call)
                if chain:  # inside a function of parameters alone: settled after the forward
                    self.unbatched.absorbed[id(call)] = call
                elif (isinstance(out, Tensor) and self.n is not None and self.n > 1
                        and (out.dim() == 0 or out.shape[0] != self.n
                             or self._batch_free(args, kwargs))):
                    self.unbatched.add(call, out)
            covered = set(names.values())
            used = [a for a in used if id(a) not in covered]
        if used and not any(t.requires_grad for t in _float_tensors(out)):
            return  # no gradient flows through it: p.dtype, p.shape, p.size(), a comparison...
        for a in used:
            self._attribute(module, a, out, func, chain)

    def _attribute(self, module, a, out, func=None, chain=False):
        """Count parameter ``a``'s use in op ``func`` (None: a view op), which no op rule
        covers, toward ``module``'s call (``chain``: an op of a function of parameters alone,
        which ``settle_chains`` may take off it)."""
        entry = self.params[id(a)]
        if module is None:
            self.outside.extend((entry[0], t) for t in _float_tensors(out) if t.requires_grad)
            return
        local = self._local.get(id(module))
        if local is None:
            local = {id(p): n for n, p in module.named_parameters()}
            self._local[id(module)] = local
        name = local.get(id(a))
        if name is None:
            op = ("a view op" if func is None else
                  torch.overrides.resolve_name(func) or getattr(func, "__name__", repr(func)))
            message = (f"module '{_path(self.paths, module)}' uses parameter '{entry[0]}', which "
                       f"belongs to neither it nor its children, in {op}, which no op rule "
                       "covers; per-example gradients of that use cannot be attributed. Move the "
                       "parameter into the module that uses it, or use it there through an op "
                       "with a rule (F.linear, a broadcast product or sum: README, 'Supported "
                       "ops').")
            if not chain:
                raise ValueError(message)
            self._foreign.append((id(a), message))  # fine if the function is taken
            return
        frame = self._stack[-1]
        if not chain:
            frame[2].discard(name)
        elif name not in frame[1]:
            frame[2].add(name)
        frame[1][name] = id(a)

    def _meet(self, t: Tensor, rep: Tensor, params: list) -> Call:
        """Record the ``ParamFunction`` call where function of parameters ``t`` met the batch
        as ``rep`` (``curvreg.unbatched``)."""
        shell = ops.ParamFunction(t, params)
        call = Call(shell, self._where(), (), None, rep, {f"p{i}": id(p) for i, p in enumerate(params)},
                    True, op="function of parameters")
        call.origin = get_gradient_edge(t)
        self.calls.append(call)
        return call

    def settle_chains(self) -> None:
        """After the forward: take the functions of parameters alone that met the batch by their
        ``ParamFunction`` calls, or leave the forward's ordinary record. A meeting stands if none
        of its parameters is spoiled (a function of it went into another op or out of the
        model), used by a module in an op outside such functions, used outside modules, or
        taken by a rule call that an unbatched output's expansion re-pointed; parameters shared
        by two meetings stand or fall together. Then the rule calls inside standing functions go,
        and so do the chain-only uses of their parameters in module calls."""
        ub = self.unbatched
        foreign, self._foreign = self._foreign, []
        if not ub.meetings:
            if foreign:
                raise ValueError(foreign[0][1])
            return
        outside = {n for n, _ in self.outside}
        bad = set(ub.spoiled) | {k for k, (n, _) in self.params.items() if n in outside}
        bad.update(key for c in self.calls if c.op is None
                   for k, key in zip(c.names, c.keys) if k not in c.chain_names)
        bad.update(key for c in ub.absorbed.values() if c.origin is not None for key in c.keys)
        meetings = [(c, set(c.keys)) for c in ub.meetings]
        grown = True
        while grown:
            grown = False
            for _, keys in meetings:
                if keys & bad and not keys <= bad:
                    bad |= keys
                    grown = True
        taken = set().union(*(keys for _, keys in meetings if not keys & bad))
        for key, message in foreign:
            if key not in taken:
                raise ValueError(message)
        drop = {id(c) for c, keys in meetings if keys & bad}
        drop.update(i for i, c in ub.absorbed.items() if set(c.keys) <= taken)
        for c in self.calls:
            if c.op is None and c.chain_names:
                keep = [(k, key) for k, key in zip(c.names, c.keys)
                        if not (k in c.chain_names and key in taken)]
                c.names, c.keys = [k for k, _ in keep], [key for _, key in keep]
                if not keep:
                    drop.add(id(c))
        self.calls = [c for c in self.calls if id(c) not in drop]
        ub.meetings, ub.absorbed = [], {}

    def covered(self, func, args, kwargs) -> set:
        """ids of the parameters an op rule covers in this call (for the fallback's re-run)."""
        try:
            use = ops.match(func, args, kwargs, self.params)
        except ops.BatchStatistics:
            return set()
        return set() if use is None else {id(use.shell._parameters[k]) for k in use.names}


def _mixing_message(path: str, kind: str, reason: str) -> str:
    return (f"module '{path}' ({kind}) {reason}. Pass GradNormTape(..., batch_norm='unbiased') "
            "for an unbiased estimate of the true per-example norms (statistics coupling "
            "included), or batch_norm='frozen' for the exact norms with this batch's statistics "
            "held constant (a different quantity); or put the BatchNorm in eval mode "
            "(module.eval()), or use GroupNorm/LayerNorm.")
