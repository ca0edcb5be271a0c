"""Diagnostics against the dense Hessian (torch.func.hessian) and brute force, in float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvreg
from curvreg.reference import loop_sq_grad_norms

from models import ce, dense_hessian


def tiny(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        x = torch.randn(12, 4, dtype=torch.double)
    else:
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 3)).double()
        x = torch.randn(12, 2, 6, 6, dtype=torch.double)
    y = torch.randint(0, 3, (12,))
    return model, [(x[:5], y[:5]), (x[5:], y[5:])], x, y


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_hvp_and_trace_against_dense(kind):
    model, batches, x, y = tiny(kind)
    h = dense_hessian(model, x, y)
    v = torch.randn(h.shape[0], dtype=torch.double)
    hv = curvreg.hessian_vector_product(model, ce, batches, v)
    assert torch.allclose(hv, h @ v, rtol=1e-10, atol=1e-12)
    exact = torch.trace(h).item()
    est = curvreg.hessian_trace(model, ce, batches, num_probes=200,
                                generator=torch.Generator().manual_seed(1))
    assert est.num_probes == 200
    assert abs(est.value - exact) < 3 * est.stderr
    pp = curvreg.hutchpp_trace(lambda u: h @ u, h.shape[0], 60, generator=torch.Generator().manual_seed(2))
    assert abs(pp.value - exact) < 3 * pp.stderr + 1e-9


def test_trace_error_shrinks_with_probes_and_matches_its_standard_error():
    """The real error |estimate - tr(H)| over 40 seeds, not the reported s.e. (which is
    std/sqrt(K) by construction): its RMS falls ~ 1/sqrt(K), and the reported s.e. is
    calibrated against it."""
    model, batches, x, y = tiny("mlp")
    h = dense_hessian(model, x, y)
    exact = torch.trace(h).item()
    rms, se = {}, {}
    for k in (10, 1000):
        ests = [curvreg.hutchinson_trace(lambda u: h @ u, h.shape[0], k,
                                         generator=torch.Generator().manual_seed(s)) for s in range(40)]
        rms[k] = (sum((e.value - exact) ** 2 for e in ests) / len(ests)) ** 0.5
        se[k] = sum(e.stderr for e in ests) / len(ests)
    assert rms[1000] < rms[10] / 5  # expect a factor of 10
    for k in rms:
        assert 0.6 < rms[k] / se[k] < 1.6, (k, rms[k], se[k])


def test_lanczos_that_runs_out_of_iterations_says_so():
    model, batches, x, y = tiny("cnn")
    res = curvreg.top_hessian_eigenvalues(model, ce, batches, k=3, tol=1e-12, max_iter=4,
                                          generator=torch.Generator().manual_seed(0))
    assert not res.converged and res.iterations == 4
    assert max(r / max(1.0, abs(v)) for r, v in zip(res.residuals, res.eigenvalues)) > 1e-12


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_top_eigenvalues(kind):
    model, batches, x, y = tiny(kind)
    exact = torch.linalg.eigvalsh(dense_hessian(model, x, y)).flip(0)
    res = curvreg.top_hessian_eigenvalues(model, ce, batches, k=3, tol=1e-10, max_iter=200,
                                          generator=torch.Generator().manual_seed(0))
    for got, want in zip(res.eigenvalues, exact[:3].tolist()):
        assert abs(got - want) <= 1e-6 * abs(want)
    assert len(res.residuals) == 3


def test_empirical_fisher_equals_loop():
    model, batches, x, y = tiny("cnn")
    value = curvreg.empirical_fisher_trace(model, ce, batches)
    assert abs(value - loop_sq_grad_norms(model, ce, x, y).mean().item()) < 1e-12 * value
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    assert abs(value - tape.per_example_sq_grad_norms(ce(out, y)).mean().item()) < 1e-12 * value


def test_fisher_trace_converges_to_exact_expectation():
    model, batches, x, y = tiny("mlp")
    probs = F.softmax(model(x), 1).detach()
    exact = 0.0
    for c in range(3):  # sum over all labels weighted by the model's probabilities
        sq = loop_sq_grad_norms(model, ce, x, torch.full_like(y, c))
        exact += (probs[:, c] * sq).mean().item()
    est = curvreg.fisher_trace(model, batches, num_samples=400, generator=torch.Generator().manual_seed(0))
    assert abs(est.value - exact) < 4 * est.stderr
    full = curvreg.fisher_trace(model, batches, labels="all")
    assert abs(full.value - exact) < 1e-12 * exact and full.num_probes == 3


def test_mode_is_never_changed_behind_the_callers_back():
    model, batches, _, _ = tiny("mlp")
    model.eval()
    curvreg.hessian_trace(model, ce, batches, num_probes=2)
    assert not model.training
    curvreg.empirical_fisher_trace(model, ce, batches, mode="train")
    assert not any(m.training for m in model.modules())


def test_error_paths():
    model, batches, _, _ = tiny("mlp")
    with pytest.raises(ValueError, match="empty"):
        curvreg.hessian_trace(model, ce, [], num_probes=2)
    with pytest.raises(ValueError, match="one loss per example"):
        curvreg.hessian_trace(model, lambda o, t: ce(o, t).mean(), batches, num_probes=2)
    with pytest.raises(ValueError, match="one loss per example"):
        curvreg.empirical_fisher_trace(model, lambda o, t: ce(o, t).mean(), batches)
    with pytest.raises(ValueError, match="probe distribution 'cauchy'"):
        curvreg.hessian_trace(model, ce, batches, num_probes=2, distribution="cauchy")
    with pytest.raises(TypeError, match="floating-point"):
        curvreg.hessian_trace(model, lambda o, t: t, batches, num_probes=2)
    frozen = nn.Linear(4, 3).double().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        curvreg.empirical_fisher_trace(frozen, ce, batches)


def test_slq_full_krylov_space_recovers_the_spectrum():
    model, batches, x, y = tiny("mlp")
    h = dense_hessian(model, x, y)
    evals = torch.linalg.eigvalsh(h)
    dim = h.shape[0]
    sd = curvreg.hessian_spectral_density(model, ce, batches, num_runs=3, num_steps=dim,
                                          generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sd.weights.sum(1), torch.ones(3, dtype=torch.double))
    # With m = D steps each run's quadrature is exact for polynomials of degree < 2D:
    # sum_l w_l theta_l^p = v^T H^p v / v^T v, and the Ritz values with weight are eigenvalues.
    gen = torch.Generator().manual_seed(0)
    vs = torch.randint(0, 2, (3, dim), generator=gen).double() * 2 - 1
    for p in (1, 2, 3):
        want = torch.stack([v @ torch.linalg.matrix_power(h, p) @ v / (v @ v) for v in vs])
        got = (sd.weights * sd.nodes ** p).sum(1)
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-12)
    heavy = sd.nodes[0][sd.weights[0] > 1e-8]
    assert (heavy[:, None] - evals[None]).abs().min(1).values.max() < 1e-8 * evals.abs().max()


def test_slq_trace_and_density_are_consistent():
    model, batches, x, y = tiny("cnn")
    h = dense_hessian(model, x, y)
    sd = curvreg.hessian_spectral_density(model, ce, batches, num_runs=60, num_steps=12,
                                          generator=torch.Generator().manual_seed(3))
    mean, se = sd.moment(lambda t: t)
    assert abs(sd.dim * mean - torch.trace(h).item()) < 4 * sd.dim * se
    grid = torch.linspace(sd.nodes.min().item() - 1, sd.nodes.max().item() + 1, 4001)
    dens = sd.density(grid, sigma=0.05)
    assert abs(torch.trapezoid(dens, grid).item() - 1) < 1e-3  # a probability density
    with pytest.raises(ValueError, match="num_runs"):
        curvreg.hessian_spectral_density(model, ce, batches, num_runs=0)


def test_relu_network_hessian_trace_equals_fisher_trace():
    """For a piecewise-linear net with softmax cross-entropy, d^2 f / d theta_j^2 = 0, so
    tr(H) = tr(Gauss-Newton) = tr(F) exactly (the label-sum Fisher, not the empirical one)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(10, 4, dtype=torch.double), torch.randint(0, 3, (10,))
    h = torch.trace(dense_hessian(model, x, y)).item()
    f = curvreg.fisher_trace(model, [(x, y)], labels="all").value
    fbar = curvreg.empirical_fisher_trace(model, ce, [(x, y)])
    assert abs(h - f) < 1e-10 * h
    assert abs(h - fbar) > 1e-3 * h  # the empirical Fisher is a different quantity


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x):
        return self.body(x) * 1.5


def _quad_models():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), bn.eval(), nn.GELU(),
                        nn.Sequential(nn.Conv2d(3, 4, 2), nn.Tanh()), nn.Dropout(0.3).eval(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    frozen = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.SiLU(), nn.Linear(5, 3)).double()
    frozen[2].weight.requires_grad_(False)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    return {"cnn": (cnn, torch.randn(7, 2, 6, 6, dtype=torch.double)),
            "frozen": (frozen, torch.randn(7, 4, dtype=torch.double)),
            "mlp": (mlp, torch.randn(7, 4, dtype=torch.double)),
            "unsupported": (Unsupported().double(), torch.randn(7, 4, dtype=torch.double))}


@pytest.mark.parametrize("kind", ["cnn", "frozen", "mlp", "unsupported"])
def test_quadratic_form_against_dense(kind):
    model, x = _quad_models()[kind]
    y = torch.randint(0, 3, (7,))
    h = dense_hessian(model, x, y)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    supported = curvreg.diagnostics.quadratic.layers_if_supported(model) is not None
    assert supported == (kind != "unsupported")
    for seed in range(3):
        v = torch.randn(flat.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.double)
        got = curvreg.hessian_quadratic_form(model, ce, [(x[:3], y[:3]), (x[3:], y[3:])], v)
        assert torch.allclose(got, v @ h @ v, rtol=1e-9, atol=1e-12)
