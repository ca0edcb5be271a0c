"""The step's parts, each against a hand computation or a brute-force loop: the penalized
objective, the SAM/GNP gradients, the learning-rate and alpha schedules."""
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvreg
from curvreg.lab.config import ConfigError, make_config
from curvreg.objective import cross_entropy
from curvreg.reference import loop_sq_grad_norms
from curvreg.lab.sam import perturbed_gradient
from curvreg.lab.train import Trainer, alpha_at, lr_at


@pytest.mark.parametrize("group_size", [1, 2])
def test_penalized_objective_matches_a_loop_in_value_and_gradient(group_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    obj = curvreg.penalized_objective(model, x, y, 0.3, group_size=group_size)
    sq = loop_sq_grad_norms(model, cross_entropy, x, y, group_size=group_size, create_graph=True)
    want = F.cross_entropy(model(x), y) + 0.3 * sq.mean()
    torch.testing.assert_close(obj.sq_norms, sq, rtol=1e-10, atol=0)
    torch.testing.assert_close(obj.value, want, rtol=1e-12, atol=0)
    got = torch.autograd.grad(obj.value, list(model.parameters()))
    ref = torch.autograd.grad(want, list(model.parameters()))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert obj.losses.shape == (6,) and obj.output.shape == (6, 3)


def test_alpha_zero_is_the_plain_objective_without_a_tape(monkeypatch):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    monkeypatch.setattr(curvreg.objective, "GradNormTape", None)  # any use would raise
    obj = curvreg.penalized_objective(model, x, y, 0.0)
    assert obj.sq_norms is None
    want = F.cross_entropy(model(x), y, reduction="none").mean()
    torch.testing.assert_close(obj.value, want, rtol=0, atol=0)


def test_bf16_autocast_keeps_the_losses_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    obj = curvreg.penalized_objective(model, x, y, 0.1, autocast=torch.bfloat16)
    assert obj.output.dtype == torch.bfloat16
    assert obj.losses.dtype == obj.sq_norms.dtype == torch.float32


# ------------------------------------------------------------------------ SAM and GNP
def quadratic():
    """L(w) = 1/2 sum_j a_j w_j^2 over two tensors, w = ([3, 0], [4]), a = ([1, 1], [2]):
    g = ([3, 0], [8]), ||g|| = sqrt(73)."""
    w1 = torch.tensor([3.0, 0.0], dtype=torch.float64, requires_grad=True)
    w2 = torch.tensor([4.0], dtype=torch.float64, requires_grad=True)
    unused = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # never gets a gradient
    calls = []

    def closure():
        for p in (w1, w2, unused):
            p.grad = None
        loss = 0.5 * (w1.pow(2).sum() + 2 * w2.pow(2).sum())
        loss.backward()
        calls.append((w1.detach().clone(), w2.detach().clone()))
        return loss.detach()

    return [w1, w2, unused], closure, calls


@pytest.mark.parametrize("beta", [1.0, 0.25, 0.0])
def test_sam_and_gnp_gradients_by_hand(beta):
    params, closure, calls = quadratic()
    rho, r = 0.5, math.sqrt(73.0)
    first = perturbed_gradient(params, closure, rho, beta=beta)
    assert first == 0.5 * (9 + 2 * 16)  # the loss at theta
    # the second call sees theta + rho g / ||g||
    torch.testing.assert_close(calls[1][0], torch.tensor([3 + rho * 3 / r, 0.0], dtype=torch.float64))
    torch.testing.assert_close(calls[1][1], torch.tensor([4 + rho * 8 / r], dtype=torch.float64))
    sam1, sam2 = [3 + rho * 3 / r, 0.0], [2 * (4 + rho * 8 / r)]
    want1 = [beta * s + (1 - beta) * g for s, g in zip(sam1, [3.0, 0.0])]
    want2 = [beta * s + (1 - beta) * g for s, g in zip(sam2, [8.0])]
    torch.testing.assert_close(params[0].grad, torch.tensor(want1, dtype=torch.float64))
    torch.testing.assert_close(params[1].grad, torch.tensor(want2, dtype=torch.float64))
    assert params[2].grad is None
    # the parameters are restored exactly
    assert params[0].tolist() == [3.0, 0.0] and params[1].tolist() == [4.0]


def test_parameters_are_restored_when_the_second_pass_fails():
    params, closure, _ = quadratic()
    state = {"n": 0}

    def failing():
        state["n"] += 1
        if state["n"] == 2:
            raise RuntimeError("diverged")
        return closure()

    with pytest.raises(RuntimeError):
        perturbed_gradient(params, failing, 0.5)
    assert params[0].tolist() == [3.0, 0.0] and params[1].tolist() == [4.0]


# ------------------------------------------------------------------------ schedules
def test_learning_rate_schedules():
    cos = make_config({"lr": 0.1, "epochs": 10, "schedule": "cosine", "warmup_epochs": 2.0})
    assert lr_at(cos, 0.0) == 0.0 and lr_at(cos, 1.0) == pytest.approx(0.05)
    assert lr_at(cos, 2.0) == pytest.approx(0.1)
    assert lr_at(cos, 6.0) == pytest.approx(0.05)          # half-way through the cosine
    assert lr_at(cos, 10.0) == pytest.approx(0.0, abs=1e-15) and lr_at(cos, 12.0) == pytest.approx(0.0, abs=1e-15)
    step = make_config({"lr": 0.1, "epochs": 10, "schedule": "step", "milestones": [4, 7], "gamma": 0.5})
    assert [lr_at(step, t) for t in (0.0, 3.99, 4.0, 6.5, 7.0, 9.9)] == \
        pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    const = make_config({"lr": 0.1, "schedule": "constant"})
    assert {lr_at(const, t) for t in (0.0, 5.5, 19.0)} == {0.1}


def test_alpha_warm_up():
    cfg = make_config({"alpha": 0.2, "alpha_warmup_epochs": 4.0})
    assert [alpha_at(cfg, t) for t in (0.0, 1.0, 3.0, 4.0, 9.0)] == pytest.approx([0.0, 0.05, 0.15, 0.2, 0.2])
    assert alpha_at(make_config({"alpha": 0.2}), 0.0) == 0.2


def test_a_batch_smaller_than_the_world_is_refused():
    def fake(n, batch, world):
        return types.SimpleNamespace(data=types.SimpleNamespace(x_train=torch.zeros(n, 1)),
                                     cfg=make_config({"batch_size": batch}), world=world)
    Trainer._check_slices(fake(250, 63, 2))       # uneven slices are fine
    Trainer._check_slices(fake(5, 64, 1))         # one process: anything goes
    with pytest.raises(ConfigError, match="a batch of 1 example\\(s\\) cannot be split over 2"):
        Trainer._check_slices(fake(129, 64, 2))  # the last batch has one example
