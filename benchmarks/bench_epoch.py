"""fc512-cifar10 epoch with and without curvature regularization, side by side in one process.

Prints the epoch-time ratio (target <= 1.7) and the share of the epoch spent on data loading and
augmentation (target < 10%). Usage: python benchmarks/bench_epoch.py [--rounds 3] [--augment]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from curvreg.lab.config import make_config
from curvreg.lab.loader import epoch_batches
from curvreg.lab.train import Trainer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--augment", action="store_true")
    args = ap.parse_args()
    trainers = {}
    for name, alpha in (("plain", 0.0), ("curvature", 5e-4)):
        cfg = make_config({"preset": "fc512-cifar10", "alpha": alpha, "augment": args.augment})
        trainers[name] = Trainer(cfg, tempfile.mkdtemp(), progress=False)
    times = {k: [] for k in trainers}
    data_times = []
    for _ in range(args.rounds):
        for name, tr in trainers.items():  # interleaved
            gen = torch.Generator().manual_seed(0)
            start = time.perf_counter()
            for x, y in epoch_batches(tr.data.x_train, tr.data.y_train, 256, gen, do_augment=args.augment):
                tr.step(x, y, 0.0)
            times[name].append(time.perf_counter() - start)
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for _ in epoch_batches(tr.data.x_train, tr.data.y_train, 256, gen, do_augment=args.augment):
            pass
        data_times.append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"threads {torch.get_num_threads()}, augment={args.augment}, 45000 training examples")
    print(f"epoch plain {med['plain']:.2f}s, curvature {med['curvature']:.2f}s, "
          f"ratio {med['curvature'] / med['plain']:.2f}x (target <= 1.7)")
    print(f"data loading + augmentation {statistics.median(data_times):.3f}s = "
          f"{100 * statistics.median(data_times) / med['plain']:.1f}% of a plain epoch (target < 10%)")


if __name__ == "__main__":
    main()
