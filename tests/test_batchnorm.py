"""Training-mode BatchNorm: GradNormTape(batch_norm="frozen" | "unbiased") against brute force.

References, float64:
  * the true per-example gradients g_i = d l_i / d theta through the batch statistics, from
    autograd on each entry of the loss vector and, independently, torch.func.jacrev of it;
  * the frozen u_i, from a batch-size-1 loop over the model whose BatchNorms use this batch's
    statistics as constants.
"""
import copy
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

import curvreg

DT = torch.float64


def cnn_two_bn():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3),
                         nn.BatchNorm2d(5), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(5, 3))


def mlp_one_bn():
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def seq_bn1d():
    """BatchNorm1d over [N, C, L] (statistics over examples and positions)."""
    return nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4, momentum=None), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 5, 3))


MODELS = {"cnn_two_bn": (cnn_two_bn, (3, 7, 7)), "mlp_one_bn": (mlp_one_bn, (6,)),
          "seq_bn1d": (seq_bn1d, (2, 7))}


def build(name, n=6, seed=0):
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = make().to(DT)
    with torch.no_grad():  # non-trivial affine parameters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(n, *shape, dtype=DT)
    y = torch.randint(0, 3, (n,))
    return model, x, y


def params_of(model):
    return [p for p in model.parameters() if p.requires_grad]


def flat(gs):
    return torch.cat([g.reshape(-1) for g in gs])


def loss_vec(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def true_grads_autograd(model, x, y):
    """[N, P] rows g_i, one autograd.grad per loss entry (statistics included)."""
    losses = loss_vec(model, x, y)
    return torch.stack([flat(torch.autograd.grad(losses[i], params_of(model), retain_graph=True))
                        for i in range(len(losses))])


def true_grads_jacrev(model, x, y):
    """[N, P] rows g_i from torch.func.jacrev of the loss vector."""
    model = copy.deepcopy(model)
    for bn in _bns(model):  # same function, without the in-place running-statistics update
        bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
        bn.num_batches_tracked = None
    named = {k: p.detach() for k, p in model.named_parameters()}
    jac = jacrev(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y,
                                           reduction="none"))(named)
    return torch.cat([jac[k].reshape(len(y), -1) for k in named], dim=1)


def true_sq(model, x, y, group_size=1):
    g = true_grads_autograd(model, x, y)
    g = g.view(-1, group_size, g.shape[1]).mean(1)
    return (g * g).sum(1)


def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def batch_stats(model, x):
    """(mean, biased var) of each BatchNorm's input in a train-mode forward, graph kept."""
    stats, handles = [], []
    for bn in _bns(model):
        def hook(mod, args):
            h = args[0]
            dims = [0] + list(range(2, h.dim()))
            stats.append((h.mean(dims), h.var(dims, unbiased=False)))
        handles.append(bn.register_forward_pre_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return stats


@contextmanager
def constant_stats(model, stats):
    """Each BatchNorm normalizes with the given (mean, var) instead of its batch's."""
    bns = _bns(model)
    for bn, (mean, var) in zip(bns, stats):
        def fwd(h, bn=bn, mean=mean, var=var):
            shape = (1, -1) + (1,) * (h.dim() - 2)
            return ((h - mean.view(shape)) / (var.view(shape) + bn.eps).sqrt()
                    * bn.weight.view(shape) + bn.bias.view(shape))
        bn.forward = fwd
    try:
        yield
    finally:
        for bn in bns:
            del bn.forward


def frozen_sq_loop(model, x, y, group_size=1, create_graph=False):
    """||u_k||^2 by a loop over groups of the statistics-held-constant model, and R's gradient
    (the total derivative, statistics' dependence on theta included) when create_graph."""
    params = params_of(model)
    stats = batch_stats(model, x)
    consts = [(m.detach().requires_grad_(), v.detach().requires_grad_()) for m, v in stats]
    sq = []
    with constant_stats(model, consts):
        for k in range(0, len(y), group_size):
            sl = slice(k, k + group_size)
            loss = F.cross_entropy(model(x[sl]), y[sl])
            g = torch.autograd.grad(loss, params, create_graph=create_graph)
            sq.append(sum((t * t).sum() for t in g))
    sq = torch.stack(sq)
    if not create_graph:
        return sq.detach(), None
    leaves = [t for pair in consts for t in pair]
    grads = torch.autograd.grad(sq.mean(), params + leaves)
    partial, d_stats = grads[:len(params)], grads[len(params):]
    via_stats = torch.autograd.grad([t for pair in stats for t in pair], params, d_stats, allow_unused=True)
    total = [a if b is None else a + b for a, b in zip(partial, via_stats)]
    return sq.detach(), flat(total)


def tape_sq(model, x, y, mode, create_graph=True, **kw):
    with curvreg.GradNormTape(model, batch_norm=mode, **kw) as tape:
        out = model(x)
    return tape.per_example_sq_grad_norms(F.cross_entropy(out, y, reduction="none"),
                                          create_graph=create_graph)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------ the references agree
@pytest.mark.parametrize("name", sorted(MODELS))
def test_true_references_agree(name):
    model, x, y = build(name)
    assert rel_err(true_grads_autograd(model, x, y), true_grads_jacrev(model, x, y)) < 1e-12


# ------------------------------------------------------------------ frozen
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("group_size", [1, 2])
def test_frozen_matches_statistics_held_constant_model(name, group_size):
    model, x, y = build(name)
    sq = tape_sq(model, x, y, "frozen", group_size=group_size)
    ref, ref_grad = frozen_sq_loop(model, x, y, group_size, create_graph=True)
    assert rel_err(sq.detach(), ref) < 1e-9
    ours = flat(torch.autograd.grad(sq.mean(), params_of(model)))
    assert rel_err(ours, ref_grad) < 1e-9
    # and it is a different quantity from the true norm
    assert rel_err(ref, true_sq(model, x, y, group_size)) > 0.05


# ------------------------------------------------------------------ unbiased
def _estimates(model, x, y, draws, **kw):
    gen = torch.Generator().manual_seed(123)
    return torch.stack([tape_sq(model, x, y, "unbiased", create_graph=False, generator=gen, **kw)
                        for _ in range(draws)])


CV = {"bn_estimator": "control_variate"}


@pytest.mark.parametrize("name,kw", [
    ("cnn_two_bn", {}),
    ("cnn_two_bn", CV),
    ("mlp_one_bn", {}),
    ("mlp_one_bn", CV),
    ("seq_bn1d", {}),
    ("seq_bn1d", CV),
    ("cnn_two_bn", {"group_size": 2}),
    ("cnn_two_bn", {"group_size": 2, **CV}),
    ("cnn_two_bn", {"estimator": "hybrid", **CV}),
    ("mlp_one_bn", {"estimator": "probe", "distribution": "gaussian"}),
    ("cnn_two_bn", {"distribution": "kronecker"}),
])
def test_unbiased_mean_matches_true_norms(name, kw):
    model, x, y = build(name)
    est = _estimates(model, x, y, 300, num_probes=4, **kw)
    true = true_sq(model, x, y, kw.get("group_size", 1))
    mean, se = est.mean(0), est.std(0) / est.shape[0] ** 0.5
    assert bool(((mean - true).abs() < 4.5 * se).all()), (mean, true, se)
    # the test has power: the frozen (exact, different) values are rejected by it
    frozen = tape_sq(model, x, y, "frozen", create_graph=False, group_size=kw.get("group_size", 1))
    assert bool(((frozen - true).abs() > 4.5 * se).any())


@pytest.mark.parametrize("bn_estimator", ["probe", "control_variate"])
def test_unbiased_penalty_gradient_is_unbiased(bn_estimator):
    model, x, y = build("cnn_two_bn")
    params = params_of(model)
    w = torch.randn(sum(p.numel() for p in params), dtype=DT, generator=torch.Generator().manual_seed(5))
    losses = loss_vec(model, x, y)
    g = [torch.autograd.grad(losses[i], params, retain_graph=True, create_graph=True)
         for i in range(len(y))]
    r_true = torch.stack([sum((t * t).sum() for t in gi) for gi in g]).mean()
    target = (flat(torch.autograd.grad(r_true, params)) @ w).item()
    gen = torch.Generator().manual_seed(7)
    samples = []
    for _ in range(300):
        sq = tape_sq(model, x, y, "unbiased", generator=gen, num_probes=4, bn_estimator=bn_estimator)
        samples.append(flat(torch.autograd.grad(sq.mean(), params)) @ w)
    s = torch.stack(samples)
    se = (s.std() / len(s) ** 0.5).item()
    assert abs(s.mean().item() - target) < 4.5 * se, (s.mean().item(), target, se)
    frozen = flat(torch.autograd.grad(tape_sq(model, x, y, "frozen").mean(), params)) @ w
    assert abs(frozen.item() - target) > 4.5 * se  # power: the frozen gradient is rejected


# ------------------------------------------------------------------ the forward is the plain one
@pytest.mark.parametrize("mode", ["frozen", "unbiased"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_loss_gradient_and_running_stats_as_plain(mode, name):
    model, x, y = build(name)
    plain = copy.deepcopy(model)
    for _ in range(2):  # twice: momentum=None averages over num_batches_tracked
        ref = loss_vec(plain, x, y)
        ref_grad = flat(torch.autograd.grad(ref.mean(), params_of(plain)))
        with curvreg.GradNormTape(model, batch_norm=mode) as tape:
            out = model(x)
        losses = F.cross_entropy(out, y, reduction="none")
        sq = tape.per_example_sq_grad_norms(losses)
        assert torch.allclose(losses, ref, rtol=1e-12, atol=1e-14)
        grad = flat(torch.autograd.grad(losses.mean(), params_of(model), retain_graph=True))
        assert rel_err(grad, ref_grad) < 1e-10  # the loss trains through the statistics
        (losses.mean() + 0.1 * sq.mean()).backward()  # and the penalty backpropagates
    # PyTorch's kernel updates them; the first BatchNorm sees the plain forward's input bit for
    # bit, later ones an input that can differ at rounding level (the taped affine step is a
    # call of its own, where the plain forward folds it into the batch_norm kernel)
    for k, (a, b) in enumerate(zip(_bns(model), _bns(plain))):
        same = torch.equal if k == 0 else lambda u, v: torch.allclose(u, v, rtol=1e-12, atol=1e-15)
        assert same(a.running_mean, b.running_mean) and same(a.running_var, b.running_var)
        assert torch.equal(a.num_batches_tracked, b.num_batches_tracked)


# ------------------------------------------------------------------ refusals
def test_default_refuses_before_the_forward_and_names_the_options():
    model, x, y = build("cnn_two_bn")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError) as err:
        with curvreg.GradNormTape(model):
            model(x)
    msg = str(err.value)
    assert "module '1' (BatchNorm2d)" in msg and "undefined" not in msg
    for word in ("batch_norm='unbiased'", "batch_norm='frozen'", "eval", "GroupNorm"):
        assert word in msg
    assert not calls


def test_functional_batch_norm_with_batch_statistics():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(4, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.out(torch.tanh(F.batch_norm(self.lin(x), None, None, training=True)))

    torch.manual_seed(0)
    model = Net().to(DT)
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match="F.batch_norm.*batch_norm='unbiased'"):
        tape_sq(model, x, y, None)
    sq = tape_sq(model, x, y, "frozen")
    stats = model.lin(x)
    mean, var = stats.mean(0).detach(), stats.var(0, unbiased=False).detach()
    ref = []
    for i in range(6):
        h = (model.lin(x[i:i + 1]) - mean) / (var + 1e-5).sqrt()
        loss = F.cross_entropy(model.out(torch.tanh(h)), y[i:i + 1])
        ref.append(sum((g * g).sum() for g in torch.autograd.grad(loss, params_of(model))))
    assert rel_err(sq.detach(), torch.stack(ref)) < 1e-9
    est = _estimates(model, x, y, 300, num_probes=4)
    mean_est, se = est.mean(0), est.std(0) / 300 ** 0.5
    assert bool(((mean_est - true_sq(model, x, y)).abs() < 4.5 * se).all())


def test_fallback_module_running_batch_statistics_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(x) * self.scale.exp()  # exp: no op rule covers this use

    model = nn.Sequential(nn.Linear(3, 4), Block(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match=r"module '1' \(Block\).*batch statistics"):
        tape_sq(model, x, y, "frozen")


def test_bad_option():
    with pytest.raises(ValueError, match="batch_norm must be"):
        curvreg.GradNormTape(nn.Linear(2, 2), batch_norm="true")
    with pytest.raises(ValueError, match="bn_estimator must be"):
        curvreg.GradNormTape(nn.Linear(2, 2), batch_norm="unbiased", bn_estimator="cv")


def test_methods_name_the_probed_reach_of_the_statistics():
    model, x, y = build("cnn_two_bn")
    with curvreg.GradNormTape(model, batch_norm="unbiased") as tape:
        out = model(x)
    tape.per_example_sq_grad_norms(F.cross_entropy(out, y, reduction="none"))
    # before the last statistics: probed through the true graph; after: exact
    assert tape.methods == {"0": "probe-bn", "1": "probe-bn", "3": "probe-bn", "4": "exact",
                            "8": "exact"}


# ------------------------------------------------------------------ diagnostics
def test_fisher_diagnostics_accept_batch_statistics():
    model, x, y = build("cnn_two_bn")
    ce = lambda o, t: F.cross_entropy(o, t, reduction="none")  # noqa: E731
    frozen_ref = frozen_sq_loop(model, x, y)[0].mean().item()
    true = true_sq(model, x, y).mean().item()
    probs = F.softmax(model(x), 1).detach()  # tr(F): the true value sums over every label
    exact = sum((probs[:, c] * true_sq(model, x, torch.full_like(y, c))).mean().item()
                for c in range(3))
    before = [b.clone() for b in model.buffers()]
    frozen = curvreg.empirical_fisher_trace(model, ce, [(x, y)], mode="train", batch_norm="frozen")
    assert abs(frozen - frozen_ref) < 1e-9 * frozen
    est = curvreg.empirical_fisher_trace(model, ce, [(x, y)], mode="train", batch_norm="unbiased",
                                         num_draws=60, generator=torch.Generator().manual_seed(0))
    assert est.num_probes == 60 and abs(est.value - true) < 4.5 * est.stderr
    assert abs(frozen - true) > 4.5 * est.stderr
    fish = curvreg.fisher_trace(model, [(x, y)], num_samples=150, mode="train", batch_norm="unbiased",
                                generator=torch.Generator().manual_seed(1))
    assert abs(fish.value - exact) < 4.5 * fish.stderr
    with pytest.raises(ValueError, match="labels='sample'"):
        curvreg.fisher_trace(model, [(x, y)], labels="all", mode="train", batch_norm="unbiased")
    for a, b in zip(model.buffers(), before):  # running statistics untouched by a measurement
        assert torch.equal(a, b)


def _sync_bn_worker(rank, world, port, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4), nn.Linear(4, 2))
        try:
            with curvreg.GradNormTape(model, batch_norm="unbiased"):
                model(torch.randn(4, 3))
            msg = "no error"
        except ValueError as e:
            msg = str(e)
        (out / f"rank{rank}.txt").write_text(msg)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_batch_norm_across_processes_is_refused(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sync_bn_worker, args=(2, port, tmp_path), nprocs=2)
    for rank in range(2):
        msg = (tmp_path / f"rank{rank}.txt").read_text()
        assert "module '1' (SyncBatchNorm)" in msg and "across processes" in msg


# ------------------------------------------------------------------ forward-mode re-run
@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("bn_estimator", ["probe", "control_variate"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_mode_rerun_equals_the_double_backward(name, bn_estimator, group_size, monkeypatch):
    """The directional derivatives of batch_norm="unbiased" from one forward-mode re-run (the
    default where the forward's functions allow it) and from the double backward: the same
    probes give the same estimate and the same penalty gradient."""
    import curvreg.tape as tape_mod
    model, x, y = build(name)
    params = params_of(model)

    def run():
        gen = torch.Generator().manual_seed(3)
        sq = tape_sq(model, x, y, "unbiased", generator=gen, bn_estimator=bn_estimator,
                     group_size=group_size, num_probes=2)
        return sq, flat(torch.autograd.grad(sq.mean(), params))

    with curvreg.GradNormTape(model, batch_norm="unbiased") as tape:
        model(x)
    assert curvreg.probe.forward_ad_ready(tape.recording)
    sq, grad = run()
    monkeypatch.setattr(tape_mod, "forward_ad_ready", lambda rec: False)
    sq_ref, grad_ref = run()
    assert rel_err(sq, sq_ref) < 1e-10 and rel_err(grad, grad_ref) < 1e-10


def test_a_forward_with_other_functions_keeps_the_double_backward():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.LayerNorm(8), nn.Linear(8, 3)).to(DT)
    with curvreg.GradNormTape(model, batch_norm="unbiased") as tape:
        model(torch.randn(4, 6, dtype=DT))
    assert not curvreg.probe.forward_ad_ready(tape.recording)  # layer_norm is not on the list


def _after_conv(fn):
    return lambda x, w, b: fn(F.conv2d(x, w, b))


FORWARD_AD_CASES = {
    "conv1d": lambda x, w, b: F.conv1d(x.flatten(2), w.flatten(2)[..., :3], b),
    "conv3d": lambda x, w, b: F.conv3d(x.unsqueeze(2), w.unsqueeze(2), b),
    "linear": lambda x, w, b: F.linear(x.flatten(1)[:, :27], w.flatten(1), b),
    "relu": _after_conv(F.relu), "gelu": _after_conv(F.gelu), "silu": _after_conv(F.silu),
    "tanh": _after_conv(torch.tanh), "sigmoid": _after_conv(torch.sigmoid),
    "adaptive_avg_pool": _after_conv(lambda h: F.adaptive_avg_pool2d(h, 2)),
    "avg_pool": _after_conv(lambda h: F.avg_pool2d(h, 2)),
    "max_pool": _after_conv(lambda h: F.max_pool2d(h, 2)),
    "pad": _after_conv(lambda h: F.pad(h, (1, 2, 0, 1))),
    "cat_mul": _after_conv(lambda h: torch.cat([h, h * h], 1)),
    "batch_norm (explicit)": _after_conv(lambda h: curvreg.batchnorm.explicit(
        (h, None, None, None, None, True), {})),
}


@pytest.mark.parametrize("case", sorted(FORWARD_AD_CASES))
def test_forward_ad_functions_differentiate_backward_correctly(case):
    """For each function FORWARD_AD_FUNCS admits (and the elementary batch norm the re-run
    uses), the gradient of sum (J v)^2 through PyTorch's forward mode equals double backprop."""
    import torch.autograd.forward_ad as fwAD
    f = FORWARD_AD_CASES[case]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 6, 6, dtype=DT, generator=gen)
    params = [torch.randn(4, 3, 3, 3, dtype=DT, generator=gen, requires_grad=True),
              torch.randn(4, dtype=DT, generator=gen, requires_grad=True)]
    v = [torch.randn(p.shape, dtype=DT, generator=gen) for p in params]

    def scalar_per_example(*ps):
        return f(x, *ps).flatten(1).tanh().sum(1)

    out = scalar_per_example(*params)
    w = torch.zeros_like(out, requires_grad=True)
    a = torch.autograd.grad(out, params, w, create_graph=True)
    jv_ref = torch.autograd.grad(sum((t * d).sum() for t, d in zip(a, v)), w, create_graph=True)[0]
    with fwAD.dual_level():
        jv = fwAD.unpack_dual(scalar_per_example(*[fwAD.make_dual(p, d) for p, d in zip(params, v)])).tangent
    assert rel_err(jv, jv_ref) < 1e-12
    # all parameters at once: a batch norm after the convolution makes the bias gradient zero
    # (rounding noise, compared relatively to the weight's)
    assert rel_err(flat(torch.autograd.grad(jv.square().sum(), params)),
                   flat(torch.autograd.grad(jv_ref.square().sum(), params))) < 1e-10


def test_a_loss_through_a_hooked_activation_keeps_the_double_backward(monkeypatch):
    """The re-run's chain rule at the model's output would miss a loss term on an activation
    kept by a hook; the tape detects the second path and uses the double backward."""
    import curvreg.tape as tape_mod
    model, x, y = build("cnn_two_bn")
    kept = []
    model[2].register_forward_hook(lambda m, a, out: kept.append(out))

    def run():
        kept.clear()
        gen = torch.Generator().manual_seed(3)
        with curvreg.GradNormTape(model, batch_norm="unbiased", generator=gen, num_probes=2) as tape:
            out = model(x)
        losses = F.cross_entropy(out, y, reduction="none") + 0.1 * kept[0].flatten(1).pow(2).mean(1)
        return tape.per_example_sq_grad_norms(losses)

    sq = run()
    monkeypatch.setattr(tape_mod, "forward_ad_ready", lambda rec: False)
    assert rel_err(sq, run()) < 1e-10


# ------------------------------------------------------------------ shared forward
def _counting(monkeypatch):
    """Counts of forward-mode re-runs and double-backward directional derivatives."""
    import curvreg.probe as probe_mod
    counts = {"rerun": 0, "double_backward": 0}
    rerun, grad = probe_mod._rerun_tangents, torch.autograd.grad

    def counted_rerun(rec, tangents):
        counts["rerun"] += 1
        return rerun(rec, tangents)

    def counted_grad(outputs, inputs, *args, **kwargs):
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 1 and not inputs.any():
            counts["double_backward"] += 1  # d <a, v> / dw with the dummy w = 0
        return grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(probe_mod, "_rerun_tangents", counted_rerun)
    monkeypatch.setattr(probe_mod.torch.autograd, "grad", counted_grad)
    return counts


@pytest.mark.parametrize("num_probes", [1, 2])
@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_shared_forward_equals_the_rerun(name, group_size, num_probes, monkeypatch):
    """From the second forward with the same signature on, the first probe's J v comes from
    the taped forward itself, run in forward mode (no re-run, no double backward): the same
    probes give the same estimate and penalty gradient as the re-run, the model's output is
    unchanged, and the running statistics move as in a plain forward."""
    import torch.autograd.forward_ad as fwAD
    model, x, y = build(name)
    params = params_of(model)
    counts = _counting(monkeypatch)

    def run():
        gen = torch.Generator().manual_seed(3)
        counts.update(rerun=0, double_backward=0)
        with curvreg.GradNormTape(model, batch_norm="unbiased", generator=gen,
                                  group_size=group_size, num_probes=num_probes) as tape:
            out = model(x)
        assert fwAD.unpack_dual(out).tangent is None
        sq = tape.per_example_sq_grad_norms(F.cross_entropy(out, y, reduction="none"))
        return out, sq, flat(torch.autograd.grad(sq.mean(), params)), dict(counts)

    plain = copy.deepcopy(model)
    out_ref, sq_ref, grad_ref, first = run()
    assert first == {"rerun": num_probes, "double_backward": 0}
    out, sq, grad, second = run()
    assert second == {"rerun": num_probes - 1, "double_backward": 0}
    assert rel_err(out, out_ref) < 1e-14
    assert rel_err(sq, sq_ref) < 1e-10 and rel_err(grad, grad_ref) < 1e-10
    plain(x)
    plain(x)
    for bn, bn_ref in zip(_bns(model), _bns(plain)):
        assert torch.allclose(bn.running_mean, bn_ref.running_mean, rtol=0, atol=1e-14)
        assert torch.allclose(bn.running_var, bn_ref.running_var, rtol=0, atol=1e-14)


def _grouped_cnn():
    """A grouped, strided, padded convolution between two BatchNorms, its bias before a Tanh
    (a bias right before a BatchNorm has no effect on the loss)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.Tanh(),
                         nn.BatchNorm2d(6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


@pytest.mark.parametrize("distribution", ["kronecker", "rademacher"])
@pytest.mark.parametrize("name", ["cnn_two_bn", "seq_bn1d", "grouped"])
def test_probed_convolutions_in_a_shared_forward_equal_the_rerun(name, distribution, monkeypatch):
    """The shared forward writes each probed convolution's tangent out as conv(x_dot, W) +
    conv(x, V), with conv(x, V) = a (x) conv(x, B) (one output channel per group) for a
    Kronecker probe; the re-run convolves in PyTorch's forward mode (with the dense a (x) B).
    Same probes, same estimate and penalty gradient."""
    if name == "grouped":
        torch.manual_seed(0)
        model, x, y = _grouped_cnn().to(DT), torch.randn(6, 3, 9, 9, dtype=DT), torch.randint(0, 3, (6,))
    else:
        model, x, y = build(name)
    params = params_of(model)
    counts = _counting(monkeypatch)
    import curvreg.shared_forward as sf
    written = []
    conv = sf.SharedForward.conv
    monkeypatch.setattr(sf.SharedForward, "conv",
                        lambda self, c: written.append(conv(self, c)) or written[-1])

    def run():
        gen = torch.Generator().manual_seed(5)
        counts.update(rerun=0, double_backward=0)
        with curvreg.GradNormTape(model, batch_norm="unbiased", generator=gen,
                                  distribution=distribution) as tape:
            out = model(x)
        sq = tape.per_example_sq_grad_norms(F.cross_entropy(out, y, reduction="none"))
        return sq, flat(torch.autograd.grad(sq.mean(), params)), dict(counts)

    sq_ref, grad_ref, first = run()
    assert first == {"rerun": 1, "double_backward": 0} and not written
    sq, grad, second = run()
    assert second == {"rerun": 0, "double_backward": 0}
    assert written and all(out is not None for out in written)  # every conv written out
    assert rel_err(sq, sq_ref) < 1e-10 and rel_err(grad, grad_ref) < 1e-10


class _Branchy(nn.Module):
    """Calls a function outside FORWARD_AD_FUNCS when ``odd`` is set."""

    def __init__(self):
        super().__init__()
        self.body, self.odd = mlp_one_bn(), False

    def forward(self, x):
        h = self.body(x)
        return torch.sin(h) if self.odd else h


def test_a_forward_that_leaves_the_list_takes_the_double_backward(monkeypatch):
    """A shared forward that meets a function without a vetted forward derivative runs it on
    primals and gives up; the step then takes the double backward, with the probe drawn
    before the forward: the same value as a tape that never tried."""
    torch.manual_seed(0)
    model = _Branchy().to(DT)
    x, y = torch.randn(6, 6, dtype=DT), torch.randint(0, 3, (6,))
    counts = _counting(monkeypatch)

    def run():
        gen = torch.Generator().manual_seed(5)
        with curvreg.GradNormTape(model, batch_norm="unbiased", generator=gen) as tape:
            out = model(x)
        return tape.per_example_sq_grad_norms(F.cross_entropy(out, y, reduction="none")), tape

    run()  # the plan: eligible
    model.odd = True
    counts.update(rerun=0, double_backward=0)
    sq, _ = run()
    assert counts == {"rerun": 0, "double_backward": 1}
    curvreg.tape._PLANS.pop(model)
    sq_ref, _ = run()  # no plan: the double backward with a probe drawn afterwards
    assert rel_err(sq, sq_ref) < 1e-12


def test_a_model_called_twice_takes_the_rerun(monkeypatch):
    model, x, y = build("mlp_one_bn")
    counts = _counting(monkeypatch)

    def run():
        gen = torch.Generator().manual_seed(2)
        counts.update(rerun=0, double_backward=0)
        with curvreg.GradNormTape(model, batch_norm="unbiased", generator=gen) as tape:
            model(x)
            out = model(x)
        return tape.per_example_sq_grad_norms(F.cross_entropy(out, y, reduction="none"))

    with curvreg.GradNormTape(model, batch_norm="unbiased") as tape:
        out = model(x)
    tape.per_example_sq_grad_norms(F.cross_entropy(out, y, reduction="none"))  # a plan
    run()
    assert counts == {"rerun": 1, "double_backward": 0}


def test_an_error_inside_a_shared_forward_leaves_no_forward_mode_level():
    import torch.autograd.forward_ad as fwAD
    model, x, y = build("mlp_one_bn")
    for _ in range(2):
        with curvreg.GradNormTape(model, batch_norm="unbiased") as tape:
            out = model(x)
        tape.per_example_sq_grad_norms(F.cross_entropy(out, y, reduction="none"))
    handle = model[2].register_forward_hook(lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        with curvreg.GradNormTape(model, batch_norm="unbiased"):
            model(x)
    handle.remove()
    with fwAD.dual_level():  # would raise if the tape's level were still open
        pass


class _WSConv(nn.Conv2d):
    """A convolution whose weight is standardized with F.batch_norm (batch statistics of the
    weight, not of the examples), as timm's StdConv2d does."""

    def forward(self, x):
        w = F.batch_norm(self.weight.view(1, self.out_channels, -1), None, None, training=True,
                         momentum=0.0, eps=1e-6).view(self.weight.shape)
        return F.conv2d(x, w, self.bias)


def _eval_bn_model():
    model, x, y = build("cnn_two_bn")
    with torch.no_grad():
        model[4].running_mean.uniform_(-0.2, 0.2)
        model[4].running_var.uniform_(0.5, 2.0)
    model[4].eval()
    return model, x, y


def _ws_conv_model():
    model, x, y = build("cnn_two_bn")
    ws = _WSConv(4, 5, 3).to(DT)
    with torch.no_grad():
        ws.weight.copy_(model[3].weight)
        ws.bias.copy_(model[3].bias)
    model[3] = ws
    return model, x, y


@pytest.mark.parametrize("make", [_eval_bn_model, _ws_conv_model], ids=["eval_bn", "ws_conv"])
def test_other_batch_norms_inside_a_shared_forward(make, monkeypatch):
    """F.batch_norm calls the tape does not take as batch statistics over examples (a
    BatchNorm on running statistics; the standardization of a weight) run with elementary ops
    inside forward mode too, where PyTorch's batch_norm kernel with batch statistics has a
    wrong backward of its forward-mode derivative: the shared forward, the re-run and the
    double backward agree. (The double backward's penalty gradient through the weight's
    batch_norm kernel would be a third derivative, which PyTorch does not have; there the
    gradients of the two forward-mode paths are compared, and the values of all three.)"""
    import curvreg.tape as tape_mod
    model, x, y = make()
    params = params_of(model)
    counts = _counting(monkeypatch)
    third_order = make is _ws_conv_model

    def run(gradient=True):
        gen = torch.Generator().manual_seed(4)
        with curvreg.GradNormTape(model, batch_norm="unbiased", generator=gen) as tape:
            out = model(x)
        sq = tape.per_example_sq_grad_norms(F.cross_entropy(out, y, reduction="none"),
                                            create_graph=gradient)
        return sq, (flat(torch.autograd.grad(sq.mean(), params)) if gradient else None)

    sq_rerun, grad_rerun = run()
    counts.update(rerun=0, double_backward=0)
    sq, grad = run()
    assert counts == {"rerun": 0, "double_backward": 0}
    assert rel_err(sq, sq_rerun) < 1e-10 and rel_err(grad, grad_rerun) < 1e-10
    monkeypatch.setattr(tape_mod, "forward_ad_ready", lambda rec: False)
    sq_db, grad_db = run(gradient=not third_order)
    assert counts["double_backward"] == 1
    assert rel_err(sq, sq_db) < 1e-10
    if not third_order:
        assert rel_err(grad, grad_db) < 1e-10


def _stats_held(z, mean, var, eps=1e-5):
    return (z - mean) * (var + eps).rsqrt()


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 2, 2), (3, 2, 2, 2, 2)])
def test_the_fused_normalization_against_elementary_ops(shape):
    """``_Normalize`` (PyTorch's batch_norm kernel, a backward of its own): (xhat, rstd) and
    their derivatives of every order as the elementary ops give them; inside the delta pass
    (switch frozen) its gradient is that of the statistics-held-constant normalization, and the
    running statistics move as a plain F.batch_norm moves them."""
    from curvreg.batchnorm import Switch, _Normalize
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64).requires_grad_()
    dims = [0] + list(range(2, x.dim()))
    cx = torch.randn(shape, dtype=torch.float64)
    cr = torch.randn([1, shape[1]] + [1] * (x.dim() - 2), dtype=torch.float64)
    switch = Switch()

    def fused(z):
        xhat, rstd = _Normalize.apply(z, switch, None, None, 0.1, 1e-5)
        return (xhat * cx).sum() + (rstd * cr).sum()

    def ops(z):
        mean = z.mean(dims, keepdim=True)
        rstd = ((z - mean).square().mean(dims, keepdim=True) + 1e-5).rsqrt()
        return ((z - mean) * rstd * cx).sum() + (rstd * cr).sum()

    assert abs(fused(x) - ops(x)) < 1e-12
    g1, = torch.autograd.grad(fused(x), x, create_graph=True)
    g2, = torch.autograd.grad(ops(x), x, create_graph=True)
    assert rel_err(g1, g2) < 1e-12
    v = torch.randn_like(x)
    h1, = torch.autograd.grad((g1 * v).sum(), x)
    h2, = torch.autograd.grad((g2 * v).sum(), x)
    assert rel_err(h1, h2) < 1e-10
    assert torch.autograd.gradcheck(fused, (x,))
    assert torch.autograd.gradgradcheck(fused, (x,))
    # without a graph (the no-graph branch), given both of the outputs' gradients or one
    xhat, rstd = _Normalize.apply(x, switch, None, None, 0.1, 1e-5)
    mean = x.mean(dims, keepdim=True)
    rstd_ops = ((x - mean).square().mean(dims, keepdim=True) + 1e-5).rsqrt()
    for pick in ((0, 1), (0,), (1,)):
        g_fused, = torch.autograd.grad([(xhat, rstd)[k] for k in pick], x,
                                       [(cx, cr)[k] for k in pick], retain_graph=True)
        g_ops, = torch.autograd.grad(sum((((x - mean) * rstd_ops * cx).sum(), (rstd_ops * cr).sum())[k]
                                         for k in pick), x, retain_graph=True)
        assert rel_err(g_fused, g_ops) < 1e-12

    switch.frozen = True  # the delta pass: the statistics are constants
    var, mean = (t.detach() for t in torch.var_mean(x, dims, unbiased=False, keepdim=True))
    xhat, _ = _Normalize.apply(x, switch, None, None, 0.1, 1e-5)
    g_fused, = torch.autograd.grad((xhat * cx).sum(), x)
    g_held, = torch.autograd.grad((_stats_held(x, mean, var) * cx).sum(), x)
    assert rel_err(g_fused, g_held) < 1e-12

    rm, rv = torch.randn(shape[1], dtype=torch.float64), torch.rand(shape[1], dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    _Normalize.apply(x.detach(), Switch(), rm, rv, 0.3, 1e-5)
    F.batch_norm(x.detach(), rm2, rv2, None, None, True, 0.3, 1e-5)
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2)


@pytest.mark.parametrize("size", [(4, 3, 2, 2), (6, 3), (3, 3, 5)])
@pytest.mark.parametrize("weight, probed", [(True, (True, True)), (True, (False, True)),
                                            (True, (True, False)), (False, (False, False))])
def test_the_affine_tangent_and_its_backward_against_autograd(weight, probed, size):
    """The shared forward's tangent of a BatchNorm's output (normalization and affine step in
    one hand-written function): the jvp of the elementary ops along the input's tangent and
    the probes of w and b (each probed or not), and gradcheck for every input."""
    from curvreg.batchnorm import _AffineTangent
    torch.manual_seed(0)
    x = torch.randn(size, dtype=torch.float64)
    dims, shape = [0] + list(range(2, x.dim())), (1, 3) + (1,) * (x.dim() - 2)
    t = torch.randn_like(x)
    w, b = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    v_w, v_b = (torch.randn(shape, dtype=torch.float64) if p else None for p in probed)

    def layer(z, w_, b_):
        mean = z.mean(dims, keepdim=True)
        out = (z - mean) * ((z - mean).square().mean(dims, keepdim=True) + 1e-5).rsqrt()
        return (out * w_ if weight else out) + b_

    zeros = torch.zeros(shape, dtype=torch.float64)
    _, expected = torch.func.jvp(layer, (x, w, b), (t, zeros if v_w is None else v_w,
                                                    zeros if v_b is None else v_b))
    mean = x.mean(dims, keepdim=True)
    rstd = ((x - mean).square().mean(dims, keepdim=True) + 1e-5).rsqrt()
    xhat = (x - mean) * rstd
    got = _AffineTangent.apply(t, xhat, rstd, w if weight else None, v_w, v_b)
    assert rel_err(got, expected) < 1e-12
    inputs = [a.clone().requires_grad_() for a in (t, xhat, rstd, w)]
    probes = [None if v is None else v.clone().requires_grad_() for v in (v_w, v_b)]

    def f(t_, xhat_, rstd_, w_, *vs):
        it = iter(vs)
        return _AffineTangent.apply(t_, xhat_, rstd_, w_ if weight else None,
                                    *[None if v is None else next(it) for v in probes])

    assert torch.autograd.gradcheck(f, tuple(inputs) + tuple(v for v in probes if v is not None))
