"""Probe estimators (estimator="probe"|"hybrid"): unbiased values and gradients, in float64.

Every check compares a Monte Carlo mean with the exact value within 4 standard errors that are
computed from the samples themselves.
"""
import pytest
import torch
from torch import nn

import curvreg

from models import build, ce

MODELS = ["mlp", "conv2d_stride_pad", "layernorm_groupnorm", "tied_embedding", "fallback_custom",
          "fallback_attention", "transposed_weights", "parameter_views"]


def estimate(model, x, y, seed, create_graph=False, **kw):
    with curvreg.GradNormTape(model, generator=torch.Generator().manual_seed(seed), **kw) as tape:
        out = model(x)
    return tape.per_example_sq_grad_norms(ce(out, y), create_graph=create_graph), tape


def exact(model, x, y, **kw):
    return estimate(model, x, y, 0, **kw)[0]


def within(samples, want, k=4.0):
    mean = samples.mean(0)
    se = samples.std(0) / samples.shape[0] ** 0.5
    return ((mean - want).abs() <= k * se + 1e-12 * want.abs().max()).all()


@pytest.mark.parametrize("estimator", ["probe", "hybrid", "probe-kronecker"])
@pytest.mark.parametrize("case", MODELS)
def test_unbiased_values(case, estimator):
    model, x, y = build(case, 5)
    want = exact(model, x, y)
    kw = dict(estimator="probe", distribution="kronecker") if "kron" in estimator else \
        dict(estimator=estimator)
    runs = [estimate(model, x, y, s, num_probes=2, **kw) for s in range(200)]
    samples = torch.stack([sq for sq, _ in runs])
    assert within(samples, want)
    if "probe" in "".join(runs[0][1].methods.values()):  # an estimate, not the exact value
        assert not torch.allclose(samples[0], want)
    else:
        assert torch.allclose(samples, want.expand_as(samples), rtol=1e-12)


@pytest.mark.parametrize("case", ["conv2d_stride_pad", "mlp"])
def test_gaussian_probes_unbiased_with_the_documented_variance(case):
    model, x, y = build(case, 5)
    want = exact(model, x, y)
    s = torch.stack([estimate(model, x, y, i, estimator="probe", distribution="gaussian")[0]
                     for i in range(400)])
    assert within(s, want)
    # One Gaussian probe: Var[(g.v)^2] = 2 ||g||^4. The sample variance of a scaled chi^2_1 has
    # relative standard error sqrt(14 / 400) ~ 0.19, so this band is ~2.5 of them wide; a
    # probe scaled by sqrt(2), or K miscounted, would fall outside it.
    ratio = (s.var(0) / (2 * want ** 2)).mean().item()
    assert 0.5 < ratio < 1.6


@pytest.mark.parametrize("estimator,distribution", [("probe", "rademacher"), ("hybrid", "rademacher"),
                                                    ("probe", "kronecker")])
def test_penalty_gradient_unbiased(estimator, distribution):
    model, x, y = build("layernorm_groupnorm", 4)
    params = list(model.parameters())

    def grad_of(sq):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(sq.mean(), params)])

    want = grad_of(exact(model, x, y, create_graph=True))
    samples = torch.stack([grad_of(estimate(model, x, y, s, create_graph=True, estimator=estimator,
                                            distribution=distribution)[0]) for s in range(400)])
    assert within(samples, want, k=4.5)


def test_group_size_and_determinism():
    model, x, y = build("conv2d_stride_pad", 6)
    want = exact(model, x, y, group_size=3)
    samples = torch.stack([estimate(model, x, y, s, estimator="probe", group_size=3)[0]
                           for s in range(300)])
    assert samples.shape == (300, 2) and within(samples, want)
    for dist in ("rademacher", "kronecker"):
        a = estimate(model, x, y, 7, estimator="hybrid", num_probes=3, distribution=dist)[0]
        b = estimate(model, x, y, 7, estimator="hybrid", num_probes=3, distribution=dist)[0]
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["conv2d_stride_pad", "conv2d_same_groups_nobias", "conv2d_reflect_circular",
                                  "conv1d_stride_dilation", "conv3d", "linear_seq_gram", "mlp"])
def test_kronecker_tangents_equal_the_dense_probe(case):
    # The one-channel shortcut must give exactly the layer evaluated at the dense probe a(x)b(x)K.
    from curvreg.probe import KronProbe, draw, local_tangents
    model, x, _ = build(case, 3)
    with curvreg.GradNormTape(model) as tape:
        model(x)
    gen = torch.Generator().manual_seed(0)
    for call in tape.recording.calls:
        names = list(call.names)
        vs = {k: draw(getattr(call.module, k), "kronecker", gen) for k in names}
        assert isinstance(vs["weight"], KronProbe)
        dense = {k: v.dense() if isinstance(v, KronProbe) else v for k, v in vs.items()}
        assert dense["weight"].shape == call.module.weight.shape
        assert set(dense["weight"].unique().tolist()) == {-1.0, 1.0}
        fast = local_tangents(call, names, vs)[0]
        want = torch.func.functional_call(call.module, dense, call.args)
        assert torch.allclose(fast, want, rtol=1e-12, atol=1e-12)


def test_hybrid_split_is_reported_and_exact_where_nothing_is_probed():
    model, x, y = build("layernorm_groupnorm", 4)
    _, tape = estimate(model, x, y, 0, estimator="hybrid")
    assert tape.methods == {"0": "probe", "1": "exact", "4": "exact", "5": "exact", "6": "exact"}
    model, x, y = build("mlp", 4)  # every layer has a cheap exact rule: no noise at all
    got, tape = estimate(model, x, y, 0, estimator="hybrid")
    assert torch.allclose(got, exact(model, x, y), rtol=1e-12)
    assert set(tape.methods.values()) == {"exact"}
    _, tape = estimate(*build("fallback_custom", 4), 0)
    assert tape.methods["1"] == "exact+fallback"  # shift: elementwise op rule; scale: fallback


def test_errors():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="num_probes"):
        curvreg.GradNormTape(model, estimator="probe", num_probes=0)
    with pytest.raises(ValueError, match="probe distribution 'cauchy'"):
        curvreg.GradNormTape(model, estimator="probe", distribution="cauchy")
    with pytest.raises(ValueError, match="unknown estimator"):
        curvreg.GradNormTape(model, estimator="sketch")
    with pytest.raises(ValueError, match="nothing to probe"):
        with curvreg.GradNormTape(nn.Linear(3, 2).requires_grad_(False), estimator="probe"):
            pass
