"""On a CUDA device (skipped without one; run by benchmarks/gpu.sh when a GPU is lent): every
rule case exact in float64 against the batch-size-1 loop on the GPU and equal to the CPU tape,
the penalty gradient, bf16 autocast against float32, probes drawn from a CUDA generator, and a
generator on another device honoured (its draws moved to the parameters' device)."""
import warnings

import pytest
import torch

import curvreg
from curvreg.reference import loop_sq_grad_norms

from models import CASES, build, ce
from test_precision import TOL, models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def on(device, model, x, y):
    return model.to(device), x.to(device), y.to(device)


def tape_sq(model, x, y, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", curvreg.FallbackWarning)
        with curvreg.GradNormTape(model, **options) as tape:
            out = model(x)
        return tape.per_example_sq_grad_norms(ce(out, y))


@pytest.mark.parametrize("case", sorted(CASES))
def test_values_and_penalty_gradient_on_the_gpu(case):
    cpu_model, x, y = build(case, n=4)
    cpu_sq = tape_sq(cpu_model, x, y).detach()
    model, x, y = on(CUDA, cpu_model, x, y)
    sq = tape_sq(model, x, y)
    assert sq.device.type == "cuda"
    assert rel_err(sq.detach(), loop_sq_grad_norms(model, ce, x, y)) < 1e-9
    assert rel_err(sq.detach().cpu(), cpu_sq) < 1e-9
    params = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(0.37 * sq.mean(), params)
    ref = torch.autograd.grad(0.37 * loop_sq_grad_norms(model, ce, x, y, create_graph=True).mean(), params)
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    assert rel_err(flat(ours), flat(ref)) < 1e-8


@pytest.mark.parametrize("name", ["mlp", "cnn", "seq"])
def test_bf16_autocast_on_the_gpu_close_to_float32(name):
    model, x = models()[name]
    y = torch.randint(0, 10, (x.shape[0],))
    model, x, y = on(CUDA, model, x, y)
    ref = curvreg.penalized_objective(model, x, y, 0.1).sq_norms
    obj = curvreg.penalized_objective(model, x, y, 0.1, autocast=torch.bfloat16)
    assert obj.output.dtype == torch.bfloat16 and obj.sq_norms.dtype == torch.float32
    assert rel_err(obj.sq_norms.detach(), ref.detach()) < TOL


@pytest.mark.parametrize("gen_device", ["cuda", "cpu"])
def test_probes_from_a_generator_on_either_device_are_reproducible_and_unbiased(gen_device):
    model, x, y = on(CUDA, *build("mlp", n=6))
    exact = loop_sq_grad_norms(model, ce, x, y)
    draws = []
    for seed in (0, 0, 1):
        gen = torch.Generator(device=gen_device).manual_seed(seed)
        draws.append(tape_sq(model, x, y, estimator="probe", num_probes=400, generator=gen).detach())
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert draws[0].device.type == "cuda"
    # 400 Rademacher probes: the relative error of each estimate is ~ sqrt(2 / 400) = 7%
    assert rel_err(draws[0], exact) < 0.3
