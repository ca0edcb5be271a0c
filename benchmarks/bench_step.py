"""Regularized vs plain training step, measured side by side in one process (float32).

Prints, per model, the median time ratio to a plain SGD step for: curvreg (exact tape),
torch.func vmap(grad) of the same penalty, and a SAM step; plus extra memory (peak RSS growth
during one step relative to the plain step's). Usage:
    python benchmarks/bench_step.py [--rounds 10] [--models fc512 fc4096 allcnn]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import curvreg
from curvreg.lab.models import build_model
from curvreg.lab.sam import perturbed_gradient

ALPHA = 0.1
SETTINGS = {"fc512": 256, "fc4096": 256, "allcnn": 32}


def machine(device: str = "cpu") -> str:
    """What the timings ran on, for a table's header: the GPU's name, or the CPU's thread count
    and memory allocator (a preloaded tcmalloc or jemalloc, or glibc's malloc and any MALLOC_*
    settings), which moves the step ratios on a CPU (README, "Cost model")."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    preload = os.environ.get("LD_PRELOAD", "")
    alloc = next((name for name in ("tcmalloc", "jemalloc") if name in preload), None)
    if alloc is None:
        tuned = sorted(k for k in os.environ if k.startswith("MALLOC_"))
        alloc = "glibc malloc" + (f" ({', '.join(tuned)})" if tuned else "")
    return f"cpu, threads {torch.get_num_threads()}, {alloc}"


def plain_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def tape_step(**tape_options):
    """A regularized step: loss + ALPHA * R, R from GradNormTape(model, **tape_options)."""
    def step(model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        curvreg.penalized_objective(model, x, y, ALPHA, **tape_options).value.backward()
        opt.step()
    return step


curvreg_step = tape_step()


def vmap_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())

    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    sq = sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
    (F.cross_entropy(model(x), y) + ALPHA * sq.mean()).backward()
    opt.step()


def sam_step(model, opt, x, y, rho=0.05):
    def closure():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    perturbed_gradient(model.parameters(), closure, rho)
    opt.step()


def vmap_bytes(model, batch):
    return batch * sum(p.numel() for p in model.parameters()) * 4 * 3


def setup(name: str, batch: int, device="cpu"):
    """(model, SGD optimizer, CIFAR-shaped random batch, labels) for a registry model."""
    torch.manual_seed(0)
    model = build_model(name).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return (model, opt, torch.randn(batch, 3, 32, 32, device=device),
            torch.randint(0, 10, (batch,), device=device))


def bf16(step):
    """``step`` with its forward under bf16 autocast (the tape keeps its rules in float32)."""
    def run(model, opt, x, y):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            step(model, opt, x, y)
    return run


def bench(name, rounds, device="cpu", autocast=False):
    batch = SETTINGS[name]
    model, opt, x, y = setup(name, batch, device)
    steps = {"plain": plain_step, "curvreg": curvreg_step, "sam": sam_step, "vmap": vmap_step}
    if autocast:
        steps = {k: bf16(f) for k, f in steps.items() if k != "vmap"}
    budget = 0.5 * (torch.cuda.get_device_properties(device).total_memory
                    if torch.device(device).type == "cuda" else 24e9)
    if "vmap" in steps and vmap_bytes(model, batch) > budget:
        print(f"  {name}: skipping vmap(grad): needs ~{vmap_bytes(model, batch) / 1e9:.0f} GB "
              f"of per-example gradients (> {budget / 1e9:.0f} GB)")
        del steps["vmap"]
    med, peak = medians(steps, (model, opt, x, y), rounds, device=device)
    return {k: med[k] / med["plain"] for k in med}, med["plain"], peak


def medians(steps, args, rounds: int, warmup: bool = True, device="cpu"):
    """(median seconds, peak device memory in bytes or None) of each step function over
    ``rounds`` interleaved rounds (after one warm-up call each), so that every ratio compares
    steps measured side by side. On CUDA each call is timed with CUDA events."""
    cuda = torch.device(device).type == "cuda"
    times = {k: [] for k in steps}
    peak = {k: None for k in steps}
    if warmup:
        for f in steps.values():
            f(*args)
    for _ in range(rounds):
        for k, f in steps.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                f(*args)
                end.record()
                torch.cuda.synchronize()
                times[k].append(start.elapsed_time(end) / 1e3)
                peak[k] = max(peak[k] or 0, torch.cuda.max_memory_allocated())
            else:
                t = time.perf_counter()
                f(*args)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (CUDA-event timings, peak memory)")
    ap.add_argument("--bf16", action="store_true", help="forward under bf16 autocast")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {machine(args.device)}, "
          f"{'bf16 autocast' if args.bf16 else 'float32'}, "
          f"alpha={ALPHA}")
    print("| model | batch | plain step (ms) | curvreg | torch.func vmap(grad) | SAM | peak memory "
          "curvreg / plain |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        ratios, plain, peak = bench(name, args.rounds, args.device, args.bf16)
        fmt = lambda k: f"{ratios[k]:.2f}x" if k in ratios else "skipped"  # noqa: E731
        mem = f"{peak['curvreg'] / peak['plain']:.2f}x" if peak["plain"] else "-"
        print(f"| {name} | {SETTINGS[name]} | {plain * 1e3:.1f} | {fmt('curvreg')} | "
              f"{fmt('vmap')} | {fmt('sam')} | {mem} |", flush=True)
        gc.collect()


if __name__ == "__main__":
    main()
