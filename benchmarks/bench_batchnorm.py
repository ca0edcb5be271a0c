"""Training-mode BatchNorm: step cost and estimator noise, measured side by side in one process.

1. Median time of a regularized step / a plain step (float32), for GradNormTape(batch_norm=
   "frozen") (exact), "unbiased" with bn_estimator "probe" (its J v from the shared forward,
   the default from the second step on, and, beside it, from a forward-mode re-run, the first
   step's way; and with Kronecker probes) and "control_variate" (K=1), and a SAM step, on
   ResNet-20 (batch 128) and the CIFAR ResNet-18 (batch 32).
2. Noise of the K=1 estimate of R = mean_i ||g_i||^2 (float64, fixed batch): relative standard
   deviation over draws, for the two "unbiased" estimators and for probing every parameter of
   the true per-example gradients, (g_i . v)^2 with g_i . v = (J_l v)_i one JVP of the loss
   vector through the train-mode graph (computed independently of the tape). Also the frozen
   value beside the true one.
Usage:
    python benchmarks/bench_batchnorm.py [--rounds 5] [--draws 200] [--models resnet20 resnet18]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import curvreg
import curvreg.tape
from bench_step import ALPHA, machine, medians, plain_step, sam_step, setup, tape_step
from curvreg.lab.models import build_model

SETTINGS = {"resnet20": 128, "resnet18": 32}


def time_steps(name, rounds):
    model, opt, x, y = setup(name, SETTINGS[name])
    probe = tape_step(batch_norm="unbiased")

    def rerun(*args):  # without the plan a shared forward needs (curvreg.shared_forward)
        curvreg.tape._PLANS.pop(model, None)
        probe(*args)

    steps = {"plain": plain_step, "frozen": tape_step(batch_norm="frozen"), "probe": probe,
             "rerun": rerun, "kron": tape_step(batch_norm="unbiased", distribution="kronecker"),
             "cv": tape_step(batch_norm="unbiased", bn_estimator="control_variate"), "sam": sam_step}
    med, _ = medians(steps, (model, opt, x, y), rounds)
    return {k: med[k] / med["plain"] for k in med}, med["plain"]


def two_bn_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def probe_all(model, x, y, gen):
    """mean_i (g_i . v)^2 with one Rademacher v over every parameter (true train-mode graph)."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses = F.cross_entropy(model(x), y, reduction="none")
    w = torch.zeros_like(losses, requires_grad=True)
    a = torch.autograd.grad(losses, params, w, create_graph=True)
    v = [torch.randint(0, 2, p.shape, generator=gen, dtype=p.dtype) * 2 - 1 for p in params]
    jv = torch.autograd.grad(sum((ai * vi).sum() for ai, vi in zip(a, v)), w)[0]
    return (jv * jv).mean().detach()


def noise(make, batch, draws, size=16):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,))
    gen = torch.Generator().manual_seed(0)

    def estimate(mode, bn_estimator="probe", distribution="rademacher"):
        with curvreg.GradNormTape(model, batch_norm=mode, generator=gen,
                                  bn_estimator=bn_estimator, distribution=distribution) as tape:
            out = model(x)
        losses = F.cross_entropy(out, y, reduction="none")
        return tape.per_example_sq_grad_norms(losses, create_graph=False).mean()

    frozen = estimate("frozen").item()
    runs = {"probe": torch.stack([estimate("unbiased") for _ in range(draws)]),
            "kron": torch.stack([estimate("unbiased", distribution="kronecker")
                                 for _ in range(draws)]),
            "cv": torch.stack([estimate("unbiased", "control_variate") for _ in range(draws)]),
            "all": torch.stack([probe_all(model, x, y, gen) for _ in range(draws)])}
    out = {"frozen": frozen}
    for k, v in runs.items():
        out[k] = (v.mean().item(), (v.std() / draws ** 0.5).item(), (v.std() / v.mean()).item())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--draws", type=int, default=200, help="0 skips the noise table")
    ap.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {machine()}, alpha={ALPHA}")
    print("\nStep time / plain step (float32, training-mode BatchNorm):")
    print("| model | batch | plain step (ms) | frozen (exact) | unbiased, probe | "
          "unbiased, probe, re-run | unbiased, probe, Kronecker | unbiased, control variate | SAM |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        r, plain = time_steps(name, args.rounds)
        print(f"| {name} | {SETTINGS[name]} | {plain * 1e3:.0f} | {r['frozen']:.2f}x | "
              f"{r['probe']:.2f}x | {r['rerun']:.2f}x | {r['kron']:.2f}x | {r['cv']:.2f}x | "
              f"{r['sam']:.2f}x |",
              flush=True)
    if not args.draws:
        return
    print(f"\nK=1 estimates of R (float64, 16x16 inputs, {args.draws} draws): mean +- s.e. "
          "(relative std of one draw)")
    print("| model | batch | frozen R (exact) | unbiased, probe | unbiased, probe, Kronecker | "
          "unbiased, control variate | probe every parameter |")
    print("|---|---|---|---|---|---|---|")
    cases = [("two-BN CNN", two_bn_cnn, 32), ("resnet20", lambda: build_model("resnet20"), 32)]
    fmt = lambda t: f"{t[0]:.4g} +- {t[1]:.2g} ({t[2]:.3f})"  # noqa: E731
    for label, make, batch in cases:
        s = noise(make, batch, args.draws)
        print(f"| {label} | {batch} | {s['frozen']:.4g} | {fmt(s['probe'])} | {fmt(s['kron'])} | "
              f"{fmt(s['cv'])} | {fmt(s['all'])} |", flush=True)


if __name__ == "__main__":
    main()
