"""Exact vs probe estimators in training: a table and curves from the sweep store.

Reads the store written by
    curvreg sweep sweeps/allcnn-estimators.yaml --workers 1 --threads 1
groups its finished runs by (alpha, estimator, probe distribution), and writes
    OUT/table.md     final test accuracy and tr(F-bar) (exact, on 1,024 training images), mean ± std
                     over seeds, with each seed's values
    OUT/curves.png   validation accuracy and tr(F-bar) per epoch, one line per run
Usage:
    python scripts/estimator_evidence.py [--db sweeps/allcnn-estimators/sweep.db]
                                         [--out docs/probe-evidence]
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
from pathlib import Path


def label(cfg: dict) -> str:
    if cfg["alpha"] == 0:
        return "alpha = 0"
    est = cfg.get("curvature_estimator", "exact")
    if est == "exact":
        return "exact penalty"
    return f"{est}, {cfg.get('probe_distribution', 'rademacher')} probes (K={cfg.get('num_probes', 1)})"


def load(db: Path):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    runs = []
    for h, cfg, summary in con.execute("select hash, config, summary from runs where status = 'done'"):
        cfg, summary = json.loads(cfg), json.loads(summary)
        curve = [json.loads(d) for (d,) in con.execute(
            "select data from metrics where hash = ? order by epoch", (h,))]
        runs.append({"label": label(cfg), "seed": cfg["seed"], "cfg": cfg, "summary": summary,
                     "curve": curve})
    return runs


def mean_std(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(runs) -> str:
    order = ["alpha = 0", "exact penalty"]
    groups = sorted({r["label"] for r in runs}, key=lambda g: (g not in order, order.index(g) if g in order else 0, g))
    lines = ["| training | seeds | test acc (%) | per seed | final tr(F̄) | per seed |",
             "|---|---|---|---|---|---|"]
    for g in groups:
        rs = sorted((r for r in runs if r["label"] == g), key=lambda r: r["seed"])
        acc = [100 * r["summary"]["test_acc"] for r in rs]
        fis = [r["summary"]["fisher_trace"] for r in rs]
        (am, asd), (fm, fsd) = mean_std(acc), mean_std(fis)
        lines.append(f"| {g} | {len(rs)} | {am:.2f} ± {asd:.2f} | {', '.join(f'{a:.2f}' for a in acc)} "
                     f"| {fm:.1f} ± {fsd:.1f} | {', '.join(f'{f:.1f}' for f in fis)} |")
    return "\n".join(lines) + "\n"


def plot(runs, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {}
    for r in sorted(runs, key=lambda r: (r["label"], r["seed"])):
        c = colors.setdefault(r["label"], f"C{len(colors)}")
        ep = [m["epoch"] for m in r["curve"]]
        kw = dict(color=c, ls="-" if r["seed"] == 0 else "--",
                  label=r["label"] if r["seed"] == 0 else None)
        axes[0].plot(ep, [100 * m["val_acc"] for m in r["curve"]], **kw)
        axes[1].plot(ep, [m["fisher_trace"] for m in r["curve"]], **kw)
    axes[0].set(xlabel="epoch", ylabel="validation accuracy (%)")
    axes[1].set(xlabel="epoch", ylabel="tr(F̄) on 1,024 training images", yscale="log")
    axes[0].legend(fontsize=8)
    fig.suptitle("All-conv net (width 0.25), 5,000 CIFAR-10 images: exact vs probe penalty "
                 "(solid seed 0, dashed seed 1)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, default=Path("sweeps/allcnn-estimators/sweep.db"))
    ap.add_argument("--out", type=Path, default=Path("docs/probe-evidence"))
    args = ap.parse_args()
    runs = load(args.db)
    if not runs:
        raise SystemExit(f"{args.db}: no finished runs; run the sweep first")
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    (args.out / "table.md").write_text(text)
    plot(runs, args.out / "curves.png")
    print(text + f"\nwritten to {args.out}/table.md and {args.out}/curves.png")


if __name__ == "__main__":
    main()
