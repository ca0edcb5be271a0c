"""Exact vs probe vs hybrid curvature penalty: step-time ratios and estimator noise.

Part 1 (speed): median time of a full regularized SGD step with each estimator (K probes),
divided by a plain SGD step, interleaved in one process (float32).
Part 2 (noise): relative standard deviation of the batch penalty estimate
R_hat = mean_i s_i over ``--draws`` independent probe draws on one fixed batch, at two batch sizes.
    python benchmarks/bench_estimators.py [--rounds 8] [--models allcnn fc512 fc4096]
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import curvreg
from curvreg.lab.models import build_model
from bench_step import medians, setup

ALPHA = 0.1
BATCH = {"fc512": 256, "fc4096": 256, "allcnn": 32}


def step(model, opt, x, y, estimator=None, k=1, gen=None, distribution="rademacher"):
    opt.zero_grad(set_to_none=True)
    if estimator is None:
        F.cross_entropy(model(x), y).backward()
    else:
        curvreg.penalized_objective(model, x, y, ALPHA, estimator=estimator, num_probes=k,
                                    generator=gen, distribution=distribution).value.backward()
    opt.step()


def speed(name, rounds, k, device="cpu"):
    model, opt, x, y = setup(name, BATCH[name], device)
    opt.param_groups[0]["lr"] = 1e-4
    gen = torch.Generator(device=device).manual_seed(0)
    variants = {"plain": (None, "rademacher"), "exact": ("exact", "rademacher"),
                "probe": ("probe", "rademacher"), "hybrid": ("hybrid", "rademacher"),
                "hybrid-kron": ("hybrid", "kronecker")}
    steps = {v: (lambda m, o, a, b, _e=est, _d=dist: step(m, o, a, b, _e, k, gen, _d))
             for v, (est, dist) in variants.items()}
    med, _ = medians(steps, (model, opt, x, y), rounds, device=device)
    return {v: med[v] / med["plain"] for v in med}, med["plain"]


def real_batch(n):
    """The first n standardized CIFAR-10 training images, or None without a local copy."""
    try:
        from curvreg.lab.data import load_arrays
        from curvreg.lab.loader import prepare
        d = prepare(load_arrays("cifar10", os.environ.get("CURVREG_DATA")), train_subset=n)
        return d.x_train, d.y_train
    except Exception:  # noqa: BLE001 - fall back to random inputs, and say so
        return None


def noise(name, n, estimator, draws, k=1, distribution="rademacher"):
    """Relative std of R_hat across probe draws on one batch (model at initialization)."""
    torch.manual_seed(0)
    model = build_model(name)
    batch = real_batch(n)
    x, y = batch if batch is not None else (torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
    gen = torch.Generator().manual_seed(1)
    with curvreg.GradNormTape(model, estimator=estimator, num_probes=k, generator=gen,
                              distribution=distribution) as tape:
        out = model(x)
    losses = F.cross_entropy(out, y, reduction="none")
    vals = torch.stack([tape.per_example_sq_grad_norms(losses, create_graph=False).mean()
                        for _ in range(draws)])
    return (vals.std() / vals.mean()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--probes", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=["allcnn", "fc512", "fc4096"], choices=list(BATCH))
    ap.add_argument("--noise-batches", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for the speed table")
    ap.add_argument("--no-noise", action="store_true", help="only the speed table")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, K={args.probes}")
    print("| model | batch | plain step (ms) | exact | probe | hybrid | hybrid, Kronecker probes |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        r, plain = speed(name, args.rounds, args.probes, args.device)
        print(f"| {name} | {BATCH[name]} | {plain * 1e3:.0f} | {r['exact']:.2f}x | {r['probe']:.2f}x "
              f"| {r['hybrid']:.2f}x | {r['hybrid-kron']:.2f}x |", flush=True)
    if args.no_noise:
        return
    src = "CIFAR-10 images" if real_batch(2) is not None else "random inputs (no CURVREG_DATA)"
    print(f"\nrelative std of the batch penalty estimate at initialization on {src}, "
          f"{args.draws} draws, K={args.probes}")
    print("| model | estimator | " + " | ".join(f"batch {b}" for b in args.noise_batches) + " |")
    print("|---|---|" + "---|" * len(args.noise_batches))
    for name in args.models:
        for est, dist in (("probe", "rademacher"), ("hybrid", "rademacher"), ("probe", "kronecker")):
            if name != "allcnn" and est == "hybrid":
                continue  # every MLP layer is exact under hybrid: no noise
            cells = [f"{noise(name, b, est, args.draws, args.probes, dist):.3f}"
                     for b in args.noise_batches]
            print(f"| {name} | {est} ({dist}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
