"""``curvreg report SWEEP_DB_OR_DIR``: the paper's tables and figures from a sweep's SQLite store.

Reads only the store (never logs or run directories). Writes into ``--out``:
    table.md            Table 1/2 layout: rows model/dataset, columns no reg | L2 only |
                        curvature only | curvature + L2, with the paper's numbers beside ours
    runs.csv            one line per run: hyperparameters, status, accuracies, Fisher trace
    selected.json       the configuration chosen for each table cell
    fig1_<m>_<d>.png    test accuracy over lr x weight decay, one panel per alpha (shared scale)
    fig2_<m>_<d>.png    % of lr x weight-decay configurations reaching a test accuracy
                        threshold, against the threshold, one curve per alpha
    curves_<m>_<d>.png  learning curves and empirical Fisher trace of each column's selection
    index.md            links everything
Selection rule: within a column, configurations that differ only in ``seed`` form one setting;
the setting with the highest mean final validation accuracy (or, with ``--select-seed S``, the
highest validation accuracy of its seed-S run) is chosen, and its final test accuracy is
reported as mean +- sample std over its seeds.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

from .sweep.store import Store, StoreError
from .runid import identity

COLUMNS = ("no reg", "L2 only", "curvature only", "curvature + L2")
PAPER = {  # Geng et al., Tables 1 and 2 (test accuracy, %)
    ("fc512", "cifar10"): (64.97, 70.16, 69.98, 71.65),
    ("fc4096", "cifar10"): (68.06, 71.36, 69.50, 74.07),
    ("allcnn", "cifar10"): (None, 92.83, None, 93.54),
    ("allcnn", "cifar100"): (None, 70.68, None, 73.39),
}
def caption(select_seed: Optional[int]) -> str:
    rule = ("the highest mean final validation accuracy over its seeds" if select_seed is None
            else f"the highest final validation accuracy of its seed-{select_seed} run")
    return ("Test accuracy (%) at the end of training, mean ± std over seeds (n = number of "
            "seeds). Selection: among the configurations of a column (weight decay = 0 or > 0, "
            "alpha = 0 or > 0; SGD only), the hyperparameter setting (all fields but the seed) "
            f"with {rule}. Paper: Geng et al., Tables 1-2, which do not state their training "
            "length; compare a row with the paper's only when its epochs are a full training run.")


def column(cfg: dict) -> Optional[str]:
    if cfg.get("method", "sgd") != "sgd":
        return None
    return COLUMNS[2 * (cfg["alpha"] > 0) + (cfg["weight_decay"] > 0)]


def setting_key(cfg: dict) -> str:
    """Runs whose configs differ only in the seed (or in fields the hash ignores) share a key."""
    return json.dumps({k: v for k, v in identity(cfg).items() if k != "seed"}, sort_keys=True)


def load(path) -> tuple:
    path = Path(path)
    db = path / "sweep.db" if path.is_dir() else path
    if not db.is_file():
        raise FileNotFoundError(f"no sweep store at {db}; pass a sweep.db or the folder holding it")
    store = Store(db)
    try:
        runs = store.runs()
        curves = {r["hash"]: store.metrics(r["hash"]) for r in runs if r["status"] == "done"}
    finally:
        store.close()
    return db, runs, curves


def select(runs: List[dict], select_seed: Optional[int] = None) -> Dict[tuple, Dict[str, dict]]:
    """{(model, dataset): {column: {"key", "val", "test": [..], "hashes": [..]}}}.

    With ``select_seed`` the choice uses only that seed's validation accuracy (so settings
    re-run with extra seeds afterwards are not favoured); the reported test accuracies are
    still those of every seed of the chosen setting. Runs without a validation split
    (``val_size: 0``) cannot be selected and are left out (they stay in runs.csv).
    """
    groups = defaultdict(lambda: defaultdict(list))
    for r in runs:
        col = column(r["config"])
        if col is None or r["status"] != "done" or r["summary"].get("val_acc") is None:
            continue
        groups[(r["config"]["model"], r["config"]["dataset"], col)][setting_key(r["config"])].append(r)
    out: Dict[tuple, Dict[str, dict]] = defaultdict(dict)
    for (model, data, col), settings in groups.items():
        def score(item):
            vals = [x["summary"]["val_acc"] for x in item[1]
                    if select_seed is None or x["config"]["seed"] == select_seed]
            return statistics.mean(vals) if vals else float("-inf")
        key, members = max(settings.items(), key=score)
        out[(model, data)][col] = {
            "key": key, "val": score((key, members)), "settings": len(settings),
            "test": [m["summary"]["test_acc"] for m in members],
            "hashes": [m["hash"] for m in members], "config": members[0]["config"]}
    return out


def _cell(sel: Optional[dict]) -> str:
    if not sel:
        return "–"
    t = [100 * x for x in sel["test"]]
    sd_text = f" ± {statistics.stdev(t):.2f}" if len(t) > 1 else ""
    return f"{statistics.mean(t):.2f}{sd_text} (n={len(t)})"


def table(selected, select_seed: Optional[int] = None) -> str:
    head = "| model / dataset | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    rows = []
    for (model, data), cols in sorted(selected.items()):
        epochs = "/".join(str(e) for e in sorted({s["config"]["epochs"] for s in cols.values()}))
        rows.append(f"| {model} / {data} (ours, {epochs} epochs) | "
                    + " | ".join(_cell(cols.get(c)) for c in COLUMNS) + " |")
        paper = PAPER.get((model, data))
        if paper:
            rows.append(f"| {model} / {data} (paper) | "
                        + " | ".join(f"{p:.2f}" if p is not None else "–" for p in paper) + " |")
    return head + "\n".join(rows) + "\n\n" + caption(select_seed) + "\n"


def chosen_hyperparameters(selected) -> str:
    lines = ["| model / dataset | column | lr | weight decay | alpha | settings tried | selection val acc |",
             "|---|---|---|---|---|---|---|"]
    for (model, data), cols in sorted(selected.items()):
        for c in COLUMNS:
            s = cols.get(c)
            if s:
                cfg = s["config"]
                lines.append(f"| {model} / {data} | {c} | {cfg['lr']:g} | {cfg['weight_decay']:g} | "
                             f"{cfg['alpha']:g} | {s['settings']} | {100 * s['val']:.2f} |")
    return "\n".join(lines) + "\n"


def write_csv(runs: List[dict], path: Path) -> None:
    fields = ["hash", "model", "dataset", "lr", "weight_decay", "alpha", "seed", "epochs", "status",
              "attempts", "val_acc", "test_acc", "train_acc", "fisher_trace", "seconds"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in runs:
            s, c = r["summary"] or {}, r["config"]
            w.writerow({"hash": r["hash"], **{k: c.get(k) for k in ("model", "dataset", "lr",
                        "weight_decay", "alpha", "seed", "epochs")}, "status": r["status"],
                        "attempts": r["attempts"], "seconds": r["seconds"],
                        **{k: s.get(k) for k in ("val_acc", "test_acc", "train_acc", "fisher_trace")}})


# ------------------------------------------------------------------------ figures
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def grid_accuracy(runs: List[dict], model: str, data: str) -> Dict[float, Dict[tuple, float]]:
    """{alpha: {(lr, wd): mean test acc over seeds}}; diverged runs count as NaN. SGD only."""
    acc = defaultdict(lambda: defaultdict(list))
    for r in runs:
        c = r["config"]
        if (c["model"], c["dataset"]) != (model, data) or c.get("method", "sgd") != "sgd":
            continue
        if r["status"] == "done":
            acc[c["alpha"]][(c["lr"], c["weight_decay"])].append(r["summary"]["test_acc"])
        elif r["status"] == "diverged":
            acc[c["alpha"]][(c["lr"], c["weight_decay"])].append(float("nan"))
    return {a: {k: statistics.mean(v) for k, v in cells.items()} for a, cells in sorted(acc.items())}


def figure1(grid, title: str, path: Path) -> None:
    """Test accuracy (%) over lr x weight decay, one panel per alpha, one colour scale; diverged
    cells are grey and say "div", cells never run are blank."""
    plt = _plt()
    import matplotlib
    alphas = list(grid)
    lrs = sorted({k[0] for g in grid.values() for k in g})
    wds = sorted({k[1] for g in grid.values() for k in g})
    vals = [100 * v for g in grid.values() for v in g.values() if not math.isnan(v)]
    if not vals:
        return
    norm = matplotlib.colors.Normalize(min(vals), max(vals))
    cmap = matplotlib.colormaps["viridis"]
    fig, axes = plt.subplots(1, len(alphas), figsize=(3.6 * len(alphas) + 1, 3.4), squeeze=False)
    im = None
    for ax, a in zip(axes[0], alphas):
        m = [[100 * grid[a].get((lr, wd), float("nan")) for lr in lrs] for wd in wds]
        im = ax.imshow(m, origin="lower", norm=norm, cmap=cmap, aspect="auto")
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                if (lrs[j], wds[i]) not in grid[a]:
                    continue  # not run: blank
                if math.isnan(v):
                    ax.add_patch(matplotlib.patches.Rectangle((j - 0.5, i - 0.5), 1, 1, color="0.75"))
                    ax.text(j, i, "div", ha="center", va="center", fontsize=7, color="k")
                else:  # dark text on the bright end of the map, white on the dark end
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7,
                            color="k" if norm(v) > 0.6 else "w")
        ax.set_xticks(range(len(lrs)), [f"{x:g}" for x in lrs], rotation=45)
        ax.set_yticks(range(len(wds)), [f"{x:g}" for x in wds] if ax is axes[0][0] else [])
        ax.set(title=f"alpha = {a:g}", xlabel="learning rate")
    axes[0][0].set_ylabel("weight decay")
    fig.colorbar(im, ax=list(axes[0]), label="test accuracy (%)")
    fig.suptitle(title, y=1.02)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def reach_curve(values: List[float], lo: float, hi: float) -> tuple:
    """The exact step function t -> % of ``values`` >= t on [lo, hi] (NaN, a diverged run,
    never reaches a threshold but counts in the total), as (xs, ys) for a ``steps-post`` plot:
    ys[k] holds on (xs[k], xs[k + 1]]."""
    ok = sorted(v for v in values if not math.isnan(v))
    n = len(values)
    xs, ys = [lo], [100 * sum(v >= lo for v in ok) / n]
    for u in sorted(set(ok)):
        if lo <= u < hi:
            xs.append(u)
            ys.append(100 * sum(v > u for v in ok) / n)
    xs.append(hi)
    ys.append(ys[-1])
    return xs, ys


def figure2(grid, title: str, path: Path) -> None:
    """For each alpha, the % of its lr x wd configurations whose test accuracy reaches each
    threshold: exact steps, from below the worst configuration to above the best."""
    plt = _plt()
    vals = [100 * v for g in grid.values() for v in g.values() if not math.isnan(v)]
    if not vals:
        return
    pad = max(0.5, 0.02 * (max(vals) - min(vals)))
    lo, hi = min(vals) - pad, max(vals) + pad
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for a, cells in grid.items():
        v = [100 * x for x in cells.values()]
        xs, ys = reach_curve(v, lo, hi)
        ax.plot(xs, ys, drawstyle="steps-post", label=f"alpha = {a:g} ({len(v)} configs)")
    ax.set(xlabel="test accuracy threshold (%)", ylabel="% of lr x wd configurations reaching it",
           title=title, xlim=(lo, hi), ylim=(-2, 102))
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def curves_figure(cols: Dict[str, dict], curves, title: str, path: Path) -> None:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for col in COLUMNS:
        s = cols.get(col)
        if not s or not curves.get(s["hashes"][0]):
            continue
        m = curves[s["hashes"][0]]
        ep = [x["epoch"] for x in m]
        mark = "o" if len(ep) < 10 else None  # a run of a few epochs is still visible
        line, = a.plot(ep, [100 * x["test_acc"] for x in m], marker=mark, label=f"{col} test")
        a.plot(ep, [100 * x["val_acc"] for x in m], ls="--", marker=mark, color=line.get_color(),
               label=f"{col} val")
        b.plot(ep, [x["fisher_trace"] for x in m], marker=mark, color=line.get_color(), label=col)
    a.set(xlabel="epoch", ylabel="accuracy (%)", title="selected setting, first seed")
    b.set(xlabel="epoch", ylabel="tr(F̄)", yscale="log",
          title="empirical Fisher trace (training examples)")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------ entry
def make_report(src, out: Optional[Path] = None, select_seed: Optional[int] = None) -> Path:
    db, runs, curves = load(src)
    if not any(r["status"] == "done" for r in runs):
        raise StoreError(f"{db} has no finished run yet ({len(runs)} runs stored); nothing to report")
    out = Path(out) if out else db.parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    selected = select(runs, select_seed)
    status = defaultdict(int)
    for r in runs:
        status[r["status"]] += 1
    (out / "table.md").write_text(table(selected, select_seed))
    write_csv(runs, out / "runs.csv")
    (out / "selected.json").write_text(json.dumps(
        [dict(sel["config"], column=col) for cols in selected.values() for col, sel in cols.items()],
        indent=1, sort_keys=True))
    figs = []
    for model, data in sorted({(r["config"]["model"], r["config"]["dataset"]) for r in runs}):
        grid = grid_accuracy(runs, model, data)
        stem = f"{model}_{data}"
        figure1(grid, f"{model} on {data}: test accuracy", out / f"fig1_{stem}.png")
        figure2(grid, f"{model} on {data}", out / f"fig2_{stem}.png")
        if selected.get((model, data)):
            curves_figure(selected[(model, data)], curves, f"{model} on {data}", out / f"curves_{stem}.png")
        figs += [p for p in (f"fig1_{stem}.png", f"fig2_{stem}.png", f"curves_{stem}.png")
                 if (out / p).is_file()]
    lines = [f"# Sweep report: `{db}`", "",
             "Runs by status: " + ", ".join(f"{k} {v}" for k, v in sorted(status.items())), "",
             "## Table", "", table(selected, select_seed), "## Selected hyperparameters", "",
             chosen_hyperparameters(selected), "## Figures", ""]
    lines += [f"![{p}]({p})" for p in figs]
    lines += ["", "All runs: [runs.csv](runs.csv). Generated by `curvreg report` from the store only."]
    (out / "index.md").write_text("\n".join(lines) + "\n")
    return out
