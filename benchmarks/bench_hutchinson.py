"""Cost of one Hutchinson probe vs a plain forward+backward on the same batch.

A probe is v^T H v. ``curvreg.hessian_trace`` computes it by second-order forward propagation
(``hessian_quadratic_form``) for Sequential models of standard layers, and as v . HVP (double
backprop) otherwise; both are timed. Interleaved in one process, float32, median ratios.
    python benchmarks/bench_hutchinson.py [--rounds 10] [--models fc512 allcnn]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import curvreg
from curvreg.lab.models import build_model

SETTINGS = {"fc512": 256, "fc4096": 256, "allcnn": 32}


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def bench(name, batch, rounds):
    torch.manual_seed(0)
    model = build_model(name)
    params = [p for p in model.parameters()]
    dim = sum(p.numel() for p in params)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    gen = torch.Generator().manual_seed(0)

    def plain():
        model.zero_grad(set_to_none=True)
        ce(model(x), y).mean().backward()

    def probe():
        v = torch.randint(0, 2, (dim,), generator=gen).float() * 2 - 1
        return curvreg.hessian_quadratic_form(model, ce, [(x, y)], v)

    def hvp():
        v = torch.randint(0, 2, (dim,), generator=gen).float() * 2 - 1
        return v @ curvreg.hessian_vector_product(model, ce, [(x, y)], v)

    fns = {"plain": plain, "probe": probe, "hvp": hvp}
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return med["probe"] / med["plain"], med["hvp"] / med["plain"], med["plain"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--models", nargs="+", default=["fc512", "allcnn"], choices=list(SETTINGS))
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32")
    print("| model | batch | forward+backward (ms) | one probe (forward, used) | v . HVP (fallback) |")
    print("|---|---|---|---|---|")
    for name in args.models:
        ratio, hvp, plain = bench(name, SETTINGS[name], args.rounds)
        print(f"| {name} | {SETTINGS[name]} | {plain * 1e3:.1f} | {ratio:.2f}x | {hvp:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
