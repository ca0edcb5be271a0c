"""Peak extra memory of a regularized step vs a plain step (CPU, float32).

Each (model, variant) runs in a fresh child process. The child builds the model, optimizer and
batch, records its peak RSS, runs two steps and records the peak again; the difference is the
step's extra peak memory (activations, graph, temporaries). Peak RSS moves by a few MB from run
to run, so each variant runs ``--repeats`` times and the median is printed, as MB and as a ratio
to the plain step's. Usage:
    python benchmarks/bench_memory.py [--models fc512 fc4096 allcnn] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

BATCH = {"fc512": 256, "fc4096": 256, "allcnn": 32}
# glibc raises its mmap threshold as large blocks are freed, after which freed memory stays in the
# heap and peak RSS depends on allocation history. A fixed threshold sends every block over
# 64 KiB to mmap, so peak RSS follows the peak of live tensor memory.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
VARIANTS = ("plain", "exact", "hybrid")


def child(name: str, variant: str) -> None:
    import torch
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_estimators import step
    from curvreg.lab.models import build_model
    torch.manual_seed(0)
    model = build_model(name)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x, y = torch.randn(BATCH[name], 3, 32, 32), torch.randint(0, 10, (BATCH[name],))
    for p in model.parameters():  # momentum buffers exist before the measurement
        p.grad = torch.zeros_like(p)
    opt.step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(2):
        step(model, opt, x, y, None if variant == "plain" else variant, 1, torch.Generator().manual_seed(0))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_mb": (after - before) / 1024}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(BATCH), choices=list(BATCH))
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per variant")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    print("| model | batch | plain step extra peak (MB) | exact | hybrid |")
    print("|---|---|---|---|---|")
    for name in args.models:
        mb = {}
        for v in VARIANTS:
            runs = []
            for _ in range(args.repeats):
                out = subprocess.run([sys.executable, __file__, "--child", name, v], check=True,
                                     capture_output=True, text=True, env=CHILD_ENV).stdout
                runs.append(json.loads(out.splitlines()[-1])["extra_mb"])
            mb[v] = statistics.median(runs)
        print(f"| {name} | {BATCH[name]} | {mb['plain']:.0f} | {mb['exact'] / mb['plain']:.2f}x "
              f"({mb['exact']:.0f} MB) | {mb['hybrid'] / mb['plain']:.2f}x ({mb['hybrid']:.0f} MB) |",
              flush=True)


if __name__ == "__main__":
    main()
