"""Where an exact regularized step's time goes, without a profiler: its phases, and the training
backward node by node (autograd hooks), for a model of ``bench_zoo.py`` (float32, CPU).

On a 2-thread CPU the torch profiler inflates this step's elementwise ops several-fold, so the
breakdowns in BENCHMARKS.md come from timers and hooks instead. Phases are medians over
``--steps`` steps; node times are means over the same number of hooked steps (the hooks add a
little time, printed beside the unhooked backward).
Usage:
    python benchmarks/node_times.py [--model vit_tiny] [--steps 3] [--top 20]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F

import curvreg
from bench_step import ALPHA, machine
from bench_zoo import MODELS, logits
from curvreg.objective import cross_entropy


def graph_nodes(root):
    """Every autograd node reachable from ``root``."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(f for f, _ in node.next_functions)
    return seen


def hook_times(root, totals, counts):
    """Add each node's backward time to ``totals[node type]`` when the graph runs."""
    start = {}
    for node in graph_nodes(root):
        def pre(_grads, node=node):
            start[node] = time.perf_counter()

        def post(_grads_in, _grads_out, node=node, name=node.name()):
            totals[name] += time.perf_counter() - start.pop(node)
            counts[name] += 1
        node.register_prehook(pre)
        node.register_hook(post)


def exact_step(model, opt, x, y, totals=None, counts=None):
    """(forward, delta pass and norms, training backward) seconds of one exact step."""
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with curvreg.GradNormTape(model) as tape:
        out = model(x)
    losses = cross_entropy(logits(out), y)
    t1 = time.perf_counter()
    sq = tape.per_example_sq_grad_norms(losses)
    total = losses.mean() + ALPHA * sq.mean()
    t2 = time.perf_counter()
    if totals is not None:
        hook_times(total.grad_fn, totals, counts)
    t3 = time.perf_counter()
    total.backward()
    t4 = time.perf_counter()
    opt.step()
    return t1 - t0, t2 - t1, t4 - t3


def plain_step(model, opt, x, y):
    """(forward, backward) seconds of one plain step."""
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = F.cross_entropy(logits(model(x)), y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    return t1 - t0, t2 - t1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_tiny", choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=20, help="node types to list")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, x, classes = MODELS[args.model]()
    y = torch.randint(0, classes, (x.shape[0],))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    warnings.simplefilter("ignore", curvreg.FallbackWarning)
    for _ in range(2):  # warm-up
        exact_step(model, opt, x, y)
        plain_step(model, opt, x, y)
    plain, exact = [], []
    for _ in range(args.steps):
        plain.append(plain_step(model, opt, x, y))
        exact.append(exact_step(model, opt, x, y))
    med = tuple([statistics.median(c) * 1e3 for c in zip(*runs)] for runs in (plain, exact))
    totals, counts = defaultdict(float), defaultdict(int)
    hooked = statistics.mean(exact_step(model, opt, x, y, totals, counts)[2] for _ in range(args.steps))
    print(f"torch {torch.__version__}, {machine()}, float32, {args.model} {list(x.shape)}")
    print(f"plain step: forward {med[0][0]:.0f} ms, backward {med[0][1]:.0f} ms")
    print(f"exact step: forward {med[1][0]:.0f} ms, delta pass and norms {med[1][1]:.0f} ms, "
          f"training backward {med[1][2]:.0f} ms ({hooked * 1e3:.0f} ms hooked); "
          f"{sum(med[1]) / sum(med[0]):.2f}x the plain step")
    print("\n| node (training backward) | ms per step | calls per step |")
    print("|---|---|---|")
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"| {name} | {t / args.steps * 1e3:.1f} | {counts[name] // args.steps} |")


if __name__ == "__main__":
    main()
