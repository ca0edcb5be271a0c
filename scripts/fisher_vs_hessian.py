"""Does tr(F_bar) / tr(H) approach 1 as an over-parameterized model converges? (paper eqs. 5-9)

Trains a 3x512 ReLU MLP (1.9M parameters) with plain SGD on the first N CIFAR-10 training
examples (no penalty, no weight decay) until the training loss is tiny, and at log-spaced
epochs measures, on the same N examples and in eval mode:
    tr(H)      Hutchinson, +- standard error
    tr(F_bar)  exact (the curvature penalty)
    tr(F)      exact: sum over the 10 labels weighted by the model's probabilities
Writes ``OUT.json`` and ``OUT.png``.

    python scripts/fisher_vs_hessian.py --examples 1000 --epochs 256 --out docs/fisher_vs_hessian
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from curvreg.lab.config import make_config
from curvreg.lab.loader import epoch_batches
from curvreg.lab.sharpness import ce, measure
from curvreg.lab.train import data_from_config, model_from_config


def checkpoints(epochs: int):
    marks, e = {0}, 1
    while e <= epochs:
        marks.update({e, int(e * 1.5)} if int(e * 1.5) <= epochs else {e})
        e *= 2
    return sorted(marks | {epochs})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--probes", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=os.environ.get("CURVREG_DATA"))
    ap.add_argument("--out", type=Path, default=Path("docs/fisher_vs_hessian"))
    args = ap.parse_args(argv)

    cfg = make_config(dict(model="fc512", train_subset=args.examples, data_dir=args.data_dir,
                           seed=args.seed, device="cpu"))
    data = data_from_config(cfg, "cpu")
    torch.manual_seed(args.seed)
    model = model_from_config(cfg, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    x, y = data.x_train, data.y_train
    batches = [(x[i:i + 500], y[i:i + 500]) for i in range(0, len(x), 500)]
    gen = torch.Generator().manual_seed(args.seed)
    rows, marks = [], checkpoints(args.epochs)
    for epoch in range(args.epochs + 1):
        if epoch in marks:
            res = measure(model, batches, probes=args.probes, eigs=1, seed=args.seed,
                          fisher_labels="all")
            rows.append({"epoch": epoch, **res})
            r = res["ratios"]
            print(f"epoch {epoch:4d}  loss {res['loss']:.3e}  acc {res['accuracy']:.3f}  "
                  f"tr(H) {res['hessian_trace']['value']:.4g}+-{res['hessian_trace']['stderr']:.2g}  "
                  f"tr(F_bar) {res['empirical_fisher_trace']:.4g}  "
                  f"tr(F) {res['fisher_trace']['value']:.4g}  "
                  f"F_bar/H {r['empirical_fisher/hessian']['value']:.3f}  "
                  f"F/H {r['fisher/hessian']['value']:.3f}", flush=True)
        if epoch == args.epochs:
            break
        model.train()
        for xb, yb in epoch_batches(x, y, args.batch_size, gen):
            opt.zero_grad(set_to_none=True)
            ce(model(xb), yb).mean().backward()
            opt.step()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.with_suffix(".json").write_text(json.dumps({"args": meta, "rows": rows}, indent=2))
    plot(rows, args.out.with_suffix(".png"), args)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


def plot(rows, path: Path, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = [r["loss"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    h = [r["hessian_trace"]["value"] for r in rows]
    hs = [r["hessian_trace"]["stderr"] for r in rows]
    a.errorbar(loss, h, yerr=hs, marker="o", label="tr(H) (Hutchinson ± s.e.)")
    a.plot(loss, [r["empirical_fisher_trace"] for r in rows], marker="s", label="tr(F̄) (exact)")
    a.plot(loss, [r["fisher_trace"]["value"] for r in rows], marker="^", ls=":",
           label="tr(F) (exact label sum)")
    a.set(xscale="log", yscale="log", xlabel="training loss (mean cross-entropy)", ylabel="trace")
    a.invert_xaxis()
    a.legend()
    for key, lab, mk in (("empirical_fisher/hessian", "tr(F̄)/tr(H)", "s"), ("fisher/hessian", "tr(F)/tr(H)", "^")):
        b.errorbar(loss, [r["ratios"][key]["value"] for r in rows],
                   yerr=[r["ratios"][key]["stderr"] for r in rows], marker=mk, label=lab)
    b.axhline(1.0, color="gray", lw=0.8, ls="--")
    b.set(xscale="log", yscale="log", xlabel="training loss (mean cross-entropy)", ylabel="ratio")
    b.invert_xaxis()
    b.legend()
    fig.suptitle(f"3x512 MLP, {args.examples} CIFAR-10 examples, plain SGD; "
                 f"training proceeds to the right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
