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

import weakref
from contextlib import contextmanager
from typing import Dict, List, Mapping, Optional

import torch
from torch import Tensor, nn

from . import batchnorm
from .exact import FallbackWarning, example_view, exact_sq_norms, merged_rows
from .probe import (batch_stats_probe, check_options, differentiable_outputs, forward_ad_ready,
                    hybrid_exact, probe_sq_norms)
from .ops import ParamFunction
from .recording import Call, Recording
from .rules import LayerRule, merge_rules, std_conv
from .shared_forward import SharedForward

__all__ = ["GradNormTape", "FallbackWarning"]


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
    ``tape.recording`` (``curvreg.recording.Recording``) is the record of the last forward.
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
        self.model, self.group_size = model, group_size
        self.estimator, self.num_probes = estimator, num_probes
        self.generator, self.distribution = generator, distribution
        self.methods: Dict[str, str] = {}
        self.check_independence = check_independence
        # module rules, applied per module call (not per op): the user's, and the built-in
        # rules of the weight-standardized convolutions the model uses (curvreg.rules.std_conv)
        found = std_conv.rules_for(model)
        self.rules = merge_rules({**found, **(rules or {})}, allow_override)
        self._module_rules = frozenset(found) | frozenset(rules or ())
        # the record of the forward (hooks, op attribution, input checks): curvreg.recording
        # batch_norm="unbiased" probes its reach with J v; with the exact estimator elsewhere
        # the forward itself may compute the first probe's (curvreg.shared_forward)
        shares = batch_norm == "unbiased" and bn_estimator == "probe" and estimator == "exact"
        self.recording = Recording(model, batch_norm=batch_norm, module_rules=self._module_rules,
                                   estimator=estimator, fuse_linear=fuse_linear,
                                   switch=batchnorm.Switch(),
                                   output_rules=frozenset(t for t in self._module_rules
                                                          if self.rules[t].with_output),
                                   shared=self._shared_forward if shares else None)
        self._active = False

    @property
    def fuse_linear(self):
        """The ``curvreg.fused`` policy: "auto" by layer size, True always, False never."""
        return self.recording.fuse_linear

    def __enter__(self) -> "GradNormTape":
        if self._active:
            raise RuntimeError("this GradNormTape is already active; tapes do not nest")
        if not any(p.requires_grad for p in self.model.parameters()):
            what = "differentiate" if self.estimator == "exact" else "probe"
            raise ValueError(f"nothing to {what}: the model has no parameter with "
                             "requires_grad=True")
        self.recording.start()
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._active = False
        self.recording.stop(*exc)


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
        rec = self.recording
        self._check_losses(losses)
        n, m = losses.shape[0], self.group_size
        if n == 0:
            return losses * 0 if create_graph else losses.detach() * 0
        rec.settle_chains()
        calls = [c for c in rec.calls if c.edges]
        for c in calls:
            c.check_versions()
        # batch_norm="unbiased": the parameters the batch statistics may depend on (those used
        # before the last statistics) are probed through the true graph, alone (bn_estimator
        # "probe": calls with only such parameters need no delta) or around their exact frozen
        # norms ("control_variate"); see curvreg.batchnorm
        reach = set().union(*rec.bn_reach) if self.batch_norm == "unbiased" else set()
        exclude = reach if self.bn_estimator == "probe" else set()
        probed = [c for c in calls if exclude and all(key in exclude for key in c.keys)]
        calls = [c for c in calls if c not in probed]
        if not (calls or rec.outside or reach):
            raise ValueError("nothing to differentiate: the taped forward used no trainable "
                             "parameter; run the model's forward inside `with tape:`")
        live = self._deltas(losses, calls, n, create_graph) if (calls or rec.outside) else []
        if not live and not reach:
            raise ValueError("losses was not produced from the taped forward: it does not depend "
                             "on any recorded module output")
        # mixed precision: the rules' arithmetic (squares and sums over positions) runs in
        # float32 on inputs and deltas promoted from bf16/fp16, outside autocast
        with torch.set_grad_enabled(create_graph), torch.autocast(losses.device.type, enabled=False):
            total = self._accumulate(live, n, exclude) if live else None
        if reach:
            forward_mode = self._forward_mode_ok(losses, reach)
            first, tangents = self._shared_probe(reach, forward_mode)
            est = batch_stats_probe(losses, live, reach, rec.params, n, m, self.num_probes,
                                    self.distribution, self.generator,
                                    self.bn_estimator == "control_variate", create_graph,
                                    rec if forward_mode else None, first, tangents)
            total = est if total is None else total + est
            for c in probed:
                kinds = self.methods.get(c.path, "")
                if "probe-bn" not in kinds.split("+"):
                    self.methods[c.path] = f"{kinds}+probe-bn" if kinds else "probe-bn"
        return total / (m * m)

    def _deltas(self, losses: Tensor, calls: List[Call], n: int, create_graph: bool) -> list:
        """[(call, its output deltas)] for the calls reached by ``losses``, after the checks:
        the delta pass (statistics held constant), parameters used outside modules, broadcast
        position tables, the example dimension and the independence check."""
        rec = self.recording
        expanded = [c for c in calls if c.origin is not None]
        views = [rec.views[vid][0] for vid in rec.view_calls
                 if vid in rec.views and rec.views[vid][0].requires_grad]
        outs = ([e for c in calls for e in c.edges] + [t for _, t in rec.outside]
                + [c.origin for c in expanded] + views)
        with self._delta_pass():
            deltas = list(torch.autograd.grad(losses.sum(), outs, retain_graph=True,
                                              create_graph=create_graph, allow_unused=True))
        view_deltas = deltas[len(deltas) - len(views):]
        del deltas[len(deltas) - len(views):]
        origin_deltas = deltas[len(deltas) - len(expanded):] if expanded else []
        del deltas[len(deltas) - len(expanded):]
        for (name, _), d in zip(rec.outside, deltas[len(deltas) - len(rec.outside):]):
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
        rec = self.recording
        for view, total in zip(views, view_deltas):
            if total is None:
                continue
            covered = torch.zeros_like(view)
            for c in rec.view_calls[id(view)]:
                d = by_call.get(id(c))
                if d and d[0] is not None:
                    args, delta = example_view(c, d[0], n)
                    g = self._rule(c).grads(c.module, args, delta, ["weight"],
                                            merged_rows(delta, n))["weight"]
                    covered = covered + g.detach().sum(0).reshape(view.shape).to(view.dtype)
            tol = 1000 * torch.finfo(total.dtype).eps
            if not torch.allclose(covered, total.detach(), rtol=tol,
                                  atol=tol * float(total.detach().abs().max())):
                param = rec.views[id(view)][1]
                raise ValueError(
                    f"parameter '{rec.params[id(param)][0]}' is used through a reshaped view "
                    "that an elementwise rule consumes and that is also used elsewhere (another "
                    "op, a module output, or after the forward); per-example gradients of that "
                    "other use cannot be separated. Use the view only in the elementwise op, or "
                    "use the parameter directly.")

    @contextmanager
    def _delta_pass(self):
        """A backward for output gradients only: the fused layers skip their weight products."""
        rec = self.recording
        for h in rec.holders:
            h.delta_pass = True
        rec.switch.frozen = True  # batch statistics held constant (curvreg.batchnorm)
        try:
            yield
        finally:
            rec.switch.frozen = False
            for h in rec.holders:
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
        if not all(bool(torch.isfinite(g).all()) for g in grads if g is not None):
            return  # a diverged model (NaN or inf) proves nothing; check again next time
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

    def _forward_mode_ok(self, losses: Tensor, reach: set) -> bool:
        """Whether ``batch_norm="unbiased"`` may take J v from a forward-mode re-run: the
        forward's functions allow it (``probe.forward_ad_ready``) and the losses depend on the
        probed parameters only through the model's output (not, say, through an activation a
        hook kept), which the re-run's chain rule at the output assumes. The second is checked
        once per model and recorded structure: the gradient of sum(losses) must equal its
        backpropagation from the output alone."""
        rec = self.recording
        if not forward_ad_ready(rec):
            return False
        key = ("forward-mode", self.model.training, losses.shape[0],
               tuple((c.path, c.op) for c in rec.calls))
        seen = _CHECKED.setdefault(self.model, set())
        if key in seen or (key, False) in seen:
            return key in seen
        outs = differentiable_outputs(rec)
        params = [rec.params[k][1] for k in rec.params if k in reach]
        grads = torch.autograd.grad(losses.sum(), outs + params, retain_graph=True,
                                    allow_unused=True)
        d, full = grads[:len(outs)], grads[len(outs):]
        outs, d = [o for o, g in zip(outs, d) if g is not None], [g for g in d if g is not None]
        via = torch.autograd.grad(outs, params, d, retain_graph=True, allow_unused=True) if outs \
            else [None] * len(params)
        same = all((a is None) == (b is None) and (a is None or torch.allclose(
            a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()) + torch.finfo(a.dtype).tiny))
            for a, b in zip(full, via))
        seen.add(key if same else (key, False))
        return same

    def _shared_forward(self, signature: tuple) -> Optional[SharedForward]:
        """At the model's first call: a forward in forward mode along the first probe, if a
        forward with this signature was found eligible before (``_shared_tangents``)."""
        params = self.recording.params
        order = _PLANS.get(self.model, {}).get(signature)
        if order is None or any(key not in params for key in order):
            return None
        return SharedForward(order, params, self.distribution, self.generator)

    def _shared_probe(self, reach: set, forward_mode: bool):
        """(first probe, output tangents along it) from this forward's shared forward, or
        Nones. The probe, drawn before the forward, serves if it covers exactly ``reach``; the
        tangents too if forward mode is valid here and the forward kept them. Both are used
        once. Where forward mode is valid, records the plan for the next forward with this
        signature."""
        rec = self.recording
        if forward_mode and rec.signature is not None and rec.root_calls == 1:
            _PLANS.setdefault(self.model, {})[rec.signature] = [k for k in rec.params if k in reach]
        shared, rec.shared = rec.shared, None
        if shared is None or set(shared.order) != reach:
            return None, None
        ok = forward_mode and shared.valid and shared.tangents is not None
        return shared.vs, (shared.tangents if ok else None)

    def _check_losses(self, losses):
        rec = self.recording
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
        if rec.n is not None and n != rec.n:
            raise ValueError(f"losses has {n} entries but the taped forward had batch size "
                             f"{rec.n}")
        if n % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide the batch size {n}")

    def _rule(self, c: Call) -> Optional[LayerRule]:
        """The rule for a call: op calls by shell type, module calls only by a user rule."""
        if c.op is None and type(c.module) not in self._module_rules:
            return None
        return self.rules.get(type(c.module))

    def _plan(self, live, exclude: set) -> List[tuple]:
        """Per live call: (names computed exactly, names probed), without the ``exclude`` keys."""
        rec = self.recording
        if self.estimator == "exact":
            plan = [(c.names, []) for c, _ in live]
        else:
            # a function of parameters alone has no forward to probe (ops.ParamFunction): its
            # parameters are computed exactly, in every call that uses them
            exact = {key for c, _ in live if isinstance(c.module, ParamFunction) for key in c.keys}
            ok = [self.estimator == "hybrid" and self._rule(c) is not None
                  and hybrid_exact(c.module, c.args) and (d[0] is None or d[0].shape[0] == rec.n)
                  for c, d in live]
            probed = {key for (c, _), good in zip(live, ok) if not good for key in c.keys} - exact
            plan = [([k for k, key in zip(c.names, c.keys) if key not in probed],
                     [k for k, key in zip(c.names, c.keys) if key in probed]) for c, _ in live]
        if not exclude:
            return plan
        keep = lambda c, names: [k for k, key in zip(c.names, c.keys)  # noqa: E731
                                 if k in names and key not in exclude]
        return [(keep(c, ex), keep(c, pr)) for (c, _), (ex, pr) in zip(live, plan)]

    def _accumulate(self, live, n: int, exclude: set) -> Optional[Tensor]:
        rec = self.recording
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
        total = exact_sq_norms(live, plan, n, self.group_size, self._rule, rec.covered)
        work = [(c, d, names) for (c, d), (_, names) in zip(live, plan) if names]
        est = probe_sq_norms(work, rec.params, n, self.group_size, self.num_probes,
                             self.distribution, self.generator)
        if est is not None:
            total = est if total is None else total + est
        return total


_CHECKS = ("once", "always", "never")
# model -> recorded structures already checked for independence (see _check_independent)
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()
# per model: {forward signature: ids of the parameters a shared forward probes, in draw order}
_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _check_leading(c: Call, delta: Tensor, n: int, dim: int = 0) -> None:
    size = delta.shape[dim] if delta.dim() > dim else None
    if size == n or (c.op is not None and size and size % n == 0):
        return
    if isinstance(c.module, nn.utils.parametrize.ParametrizationList):
        raise ValueError(
            f"{c.where} computes a parameter from parameters alone (torch.nn.utils.parametrize, "
            "e.g. weight_norm) for an op no rule takes with such a weight; its per-example "
            "gradients cannot be computed exactly here. Remove the parametrization "
            "(torch.nn.utils.parametrize.remove_parametrizations(module, name)) or freeze its "
            "parameters (requires_grad_(False)).")
    merged = " (an op may merge examples with another axis, example-major)" if c.op is not None else ""
    raise ValueError(f"{c.where} produced an output with dim {dim} of size {size}, not the batch "
                     f"size {n}; keep the example dimension first and unmerged{merged}. A "
                     "parameter used without an example dimension (a position table looked up "
                     "with shape [1, T] ids) must be broadcast to the batch before its rule op.")
