"""The two exact per-example forms of a convolution's weight norm, timed side by side on this
device, to calibrate the rule's cost model (``curvreg.rules.conv.GRAM_FLOP_COST``).

For each layer shape: the time of ||g_i(W)||^2 and its backward (as in a regularized step) by the
Gram form and by the materialized form (one grouped convolution), each divided by the form's
flop count; the median ratio (Gram time per flop / materialized time per flop) over the shapes is
the device's GRAM_FLOP_COST. Usage:
    python benchmarks/bench_conv_forms.py [--device cpu] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from curvreg.rules import conv

# (N, C_in, C_out, H, kernel, stride): the paper's all-conv net and ResNet-20/18 layers, at
# CPU-sized batches
SHAPES = [(32, 3, 96, 32, 3, 1), (32, 96, 96, 32, 3, 2), (32, 96, 192, 16, 3, 1),
          (32, 192, 192, 8, 3, 1), (32, 192, 192, 8, 1, 1), (64, 16, 16, 32, 3, 1),
          (64, 32, 32, 16, 3, 1), (64, 64, 64, 8, 3, 1), (16, 128, 128, 16, 3, 1),
          (16, 256, 256, 8, 3, 1)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_form(layer, x, delta, gram: bool, rounds: int, device) -> float:
    real = conv.use_gram
    conv.use_gram = lambda *a, **k: gram
    try:
        times = []
        for r in range(rounds + 1):
            xx, dd = x.clone().requires_grad_(), delta.clone().requires_grad_()
            sync(device)
            t = time.perf_counter()
            s = conv.conv_sq_norms(layer, (xx,), dd, ["weight"], 1)
            s.sum().backward()
            sync(device)
            if r:
                times.append(time.perf_counter() - t)
        return statistics.median(times)
    finally:
        conv.use_gram = real


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {device}, threads {torch.get_num_threads()}, float32")
    print("| N | C_in | C_out | H | k | s | Gram (ms) | materialized (ms) | flops Gram / mat | "
          "cost per flop Gram / mat |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for n, cin, cout, h, k, s in SHAPES:
        layer = nn.Conv2d(cin, cout, k, stride=s, padding=k // 2).to(device)
        x = torch.randn(n, cin, h, h, device=device)
        delta = torch.randn_like(F.conv2d(x, layer.weight, stride=s, padding=k // 2))
        positions, ck = delta[0, 0].numel(), cin * k * k
        flops_gram = positions * positions * (ck + cout)
        flops_mat = positions * ck * cout
        tg = time_form(layer, x, delta, True, args.rounds, device)
        tm = time_form(layer, x, delta, False, args.rounds, device)
        ratio = (tg / flops_gram) / (tm / flops_mat)
        ratios.append(ratio)
        print(f"| {n} | {cin} | {cout} | {h} | {k} | {s} | {1e3 * tg:.2f} | {1e3 * tm:.2f} | "
              f"{flops_gram / flops_mat:.3g} | {ratio:.3g} |")
    print(f"\nGRAM_FLOP_COST[{device.type!r}] = {statistics.median(ratios):.3g}  (median over "
          f"{len(ratios)} shapes; currently {conv.GRAM_FLOP_COST.get(device.type, 1.0):.3g})")


if __name__ == "__main__":
    main()
