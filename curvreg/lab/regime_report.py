"""``curvreg report --study regimes``: the regime table and figure of the study in
``sweeps/make_regimes_spec.py`` (when does curvature regularization help?).

Reads only the sweep store. Writes into ``--out`` (``docs/regimes/`` for the committed study):
    table.md       per regime (activation, batch size) and method (L2 only, curvature + L2,
                   SAM + L2, GNP + L2): test accuracy of the selected configuration, mean +- std
                   over its seeds, its final tr(F_bar), how much of the budget has run, and the
                   paired per-seed difference to L2 only
    selected.json  the selections whose whole budget has run (input of ``make_regimes_spec.py
                   --seeds-for``; a provisional selection could still change, so it is left out)
    regimes.png    the same as a figure: test accuracy, the paired difference to L2 only and
                   final tr(F_bar) per regime
With ``sharpness`` (default ``<out>/sharpness`` where it exists), the table also shows tr(H) +-
s.e. and lambda_1 of each selected configuration's seed-0 model, from the ``curvreg sharpness``
JSON files in that folder whose ``source`` is that run's directory.
Selection (fixed in the spec before any run): per regime and method, the configuration whose
seed-0 run has the best final validation accuracy. The first line of table.md is a digest of
the store's runs, so a test can tell whether the committed report was made from the committed
store (and then regenerates it byte for byte).
"""
from __future__ import annotations

import hashlib
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

from .report import load, setting_key
from .sweep.store import StoreError

METHODS = ("L2 only", "curvature + L2", "SAM + L2", "GNP + L2")
COLORS = {"L2 only": "#4c72b0", "curvature + L2": "#dd8452", "SAM + L2": "#55a868",
          "GNP + L2": "#c44e52"}


def method_label(cfg: dict) -> str:
    if cfg.get("method", "sgd") == "sam":
        return "SAM + L2"
    if cfg.get("method", "sgd") == "gnp":
        return "GNP + L2"
    return "curvature + L2" if cfg["alpha"] > 0 else "L2 only"


def regime_label(cfg: dict) -> str:
    return f"{cfg['activation']}, batch {cfg['batch_size']}"


def digest(runs: List[dict]) -> str:
    """sha256 of every run's hash, status and summary: equal stores give equal reports."""
    h = hashlib.sha256()
    for r in sorted(runs, key=lambda r: r["hash"]):
        h.update(json.dumps([r["hash"], r["status"], r["summary"]], sort_keys=True).encode())
    return h.hexdigest()[:16]


def select(runs: List[dict]) -> Dict[str, Dict[str, dict]]:
    """{regime: {method: {...}}}: budget progress and the selected setting's seeds."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in runs:
        groups[(regime_label(r["config"]), method_label(r["config"]))][setting_key(r["config"])].append(r)
    out: Dict[str, Dict[str, dict]] = defaultdict(dict)
    for (regime, method), settings in groups.items():
        def seed0(members):
            return next((m for m in members if m["config"]["seed"] == 0), None)
        budget = [s for s in settings.values() if seed0(s) is not None]
        done = [s for s in budget if seed0(s)["status"] == "done"]
        entry = {"budget": len(budget), "done": len(done)}
        if done:
            best = max(done, key=lambda s: seed0(s)["summary"]["val_acc"])
            finished = sorted((m for m in best if m["status"] == "done"), key=lambda m: m["config"]["seed"])
            entry.update(config=seed0(best)["config"], val=seed0(best)["summary"]["val_acc"],
                         hash0=seed0(best)["hash"],
                         seeds=[m["config"]["seed"] for m in finished],
                         vals=[m["summary"]["val_acc"] for m in finished],
                         test=[m["summary"]["test_acc"] for m in finished],
                         fisher=[m["summary"]["fisher_trace"] for m in finished])
        out[regime][method] = entry
    return out


def _mean_sd(values: List[float], scale: float = 1.0, digits: int = 2) -> str:
    v = [scale * x for x in values]
    sd = f" ± {statistics.stdev(v):.{digits}f}" if len(v) > 1 else ""
    return f"{statistics.mean(v):.{digits}f}{sd}"


def paired_difference(entry: dict, base: dict, metric: str = "test") -> Optional[tuple]:
    """(mean, standard error, n) of accuracy differences (points) over common seeds; ``metric``
    is ``"test"`` or ``"vals"`` (validation)."""
    a = dict(zip(entry.get("seeds", []), entry.get(metric, [])))
    b = dict(zip(base.get("seeds", []), base.get(metric, [])))
    d = [100 * (a[s] - b[s]) for s in sorted(set(a) & set(b))]
    if len(d) < 2:
        return None
    return statistics.mean(d), statistics.stdev(d) / len(d) ** 0.5, len(d)


def _diff_cell(diff: Optional[tuple]) -> str:
    return f"{diff[0]:+.2f} ± {diff[1]:.2f} (n={diff[2]})" if diff else "–"


def best_regime(selected, seeds=(0, 1, 2)) -> tuple:
    """The regime where curvature + L2 helps most, by the rule fixed before stage 2 ran:
    the largest mean paired *validation* accuracy difference of its curvature + L2 selection
    over its L2-only selection across ``seeds`` (the test accuracies play no part). Every
    regime's two selections must have run their whole budget and all the seeds; otherwise a
    StoreError says what is missing. Returns (regime, mean, standard error) in points."""
    scores, missing = {}, []
    for regime in sorted(selected, key=_regime_order):
        pair = [selected[regime].get(m, {}) for m in ("curvature + L2", "L2 only")]
        lacking = [f"{m}: {e.get('done', 0)}/{e.get('budget', '?')} of the budget, seeds "
                   f"{e.get('seeds', [])}" for m, e in zip(("curvature + L2", "L2 only"), pair)
                   if e.get("done") != e.get("budget") or not set(seeds) <= set(e.get("seeds", []))]
        if lacking:
            missing.append(f"{regime} ({'; '.join(lacking)})")
            continue
        scores[regime] = paired_difference(*pair, metric="vals")[:2]
    if missing or not scores:
        raise StoreError("the best regime is chosen once every regime's L2-only and curvature + "
                         f"L2 selections have seeds {list(seeds)} done; missing: "
                         + ("; ".join(missing) or "every regime"))
    regime = max(scores, key=lambda r: scores[r][0])
    return (regime, *scores[regime])


def _regime_order(name: str) -> tuple:
    act, batch = name.split(", batch ")
    return int(batch), ("relu", "gelu").index(act) if act in ("relu", "gelu") else 2, act


def sharpness_by_run(folder: Optional[Path]) -> Dict[str, dict]:
    """{run hash: ``curvreg sharpness`` result} for the JSON files in ``folder``: the run whose
    directory is the result's ``source``, or the one named by ``retrained_from`` where the
    model was retrained from that run's stored config (its directory was not kept)."""
    out = {}
    for path in sorted(Path(folder).glob("*.json")) if folder is not None else []:
        res = json.loads(path.read_text())
        out[res.get("retrained_from") or Path(res["source"]).name] = res
    return out


def _sharpness_cell(res: Optional[dict]) -> str:
    if res is None:
        return "–"
    h = res["hessian_trace"]
    mark = " (retrained)" if "retrained_from" in res else ""
    return f"{h['value']:.0f} ± {h['stderr']:.0f}, {res['top_eigenvalues'][0]:.3g}{mark}"


FAST_NOTE = ("Test accuracy at the end of training (40 epochs), mean ± std over the seeds of "
             "the selected configuration. Selection: per regime and method, the best seed-0 final "
             "validation accuracy within the budget (4 configurations per method, fixed in "
             "`sweeps/make_regimes_spec.py` before any run).")
LONG_NOTE = ("Test accuracy at the end of training (100 epochs, ZCA + crop/flip), mean ± std over "
             "seeds 0–2. One configuration per method: the fast study's selection at the regime "
             "chosen by `sweeps/make_regime_followups.py` (no tuning under this pipeline).")


def table(selected, store_digest: str, sharpness: Optional[Dict[str, dict]] = None,
          note: str = FAST_NOTE) -> str:
    sharpness = sharpness or {}
    lines = [f"Store digest: `{store_digest}`", "",
             "| regime | method | test acc (%) | seeds | final tr(F̄) | tr(H), λ₁ (seed 0) | budget run | "
             "selected configuration | Δ vs L2 only (points, paired) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for regime in sorted(selected, key=_regime_order):
        cols = selected[regime]
        for method in METHODS:
            e = cols.get(method)
            if e is None:
                continue
            budget = f"{e['done']}/{e['budget']}" + ("" if e["done"] == e["budget"] else " (provisional)")
            if "test" not in e:
                lines.append(f"| {regime} | {method} | – | 0 | – | – | {budget} | – | – |")
                continue
            c = e["config"]
            knobs = [f"wd {c['weight_decay']:g}"]
            if c["alpha"] > 0:
                knobs.append(f"α {c['alpha']:g}")
            if c.get("method", "sgd") != "sgd":
                knobs.append(f"ρ {c['rho']:g}")
            diff = paired_difference(e, cols.get("L2 only", {})) if method != "L2 only" else None
            lines.append(f"| {regime} | {method} | {_mean_sd(e['test'], 100)} | {len(e['test'])} | "
                         f"{_mean_sd(e['fisher'], 1.0, 3)} | {_sharpness_cell(sharpness.get(e['hash0']))} | "
                         f"{budget} | {', '.join(knobs)} | {_diff_cell(diff)} |")
    lines += ["", note + " Δ: mean ± standard error of the "
              "per-seed differences to L2 only. tr(F̄) = mean_i ||∇ℓ_i||² on 1,024 training "
              "examples at the end. tr(H) ± s.e. (100 Hutchinson probes) and the top Hessian "
              "eigenvalue λ₁ of the seed-0 model, from `curvreg sharpness` on its first 2,048 "
              "training images (– where not measured; \"retrained\": on a model retrained from the "
              "run's stored config, whose own directory was not kept). \"provisional\": not all of the budget "
              "has run yet."]
    return "\n".join(lines) + "\n"


def figure(selected, path: Path, title: str) -> None:
    """Test accuracy (mean, std over seeds), the paired difference to L2 only and final
    tr(F_bar) of each regime's selections."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    regimes = sorted(selected, key=_regime_order)
    fig, (ax_acc, ax_d, ax_f) = plt.subplots(1, 3, figsize=(16, 4.2))
    offset = 0.15
    for k, method in enumerate(METHODS):
        points = {True: ([], [], [], []), False: ([], [], [], [])}  # complete budget or not
        for i, regime in enumerate(regimes):
            e = selected[regime].get(method, {})
            if "test" not in e:
                continue
            t = [100 * x for x in e["test"]]
            xs, acc, sd, fish = points[e["done"] == e["budget"]]
            xs.append(i + (k - 1.5) * offset)
            acc.append(statistics.mean(t))
            sd.append(statistics.stdev(t) if len(t) > 1 else 0.0)
            fish.append(statistics.mean(e["fisher"]))
        for full, (xs, acc, sd, fish) in points.items():
            if not xs:
                continue
            style = dict(color=COLORS[method], marker="os^D"[k], linestyle="none",
                         label=method if full else None)
            if not full:  # provisional: hollow
                style["markerfacecolor"] = "white"
            ax_acc.errorbar(xs, acc, yerr=sd, capsize=3, **style)
            ax_f.plot(xs, fish, **style)
    _paired_panel(ax_d, selected, regimes, offset)
    labels = [r.replace(", ", "\n") for r in regimes]
    for ax in (ax_acc, ax_d, ax_f):
        ax.set_xticks(range(len(regimes)))
        ax.set_xticklabels(labels)
        ax.set_xlim(-0.5, len(regimes) - 0.5)
        ax.grid(axis="y", alpha=0.3)
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_title("selected configuration per method (bars: std over seeds; hollow: "
                     "provisional)", fontsize=10)
    ax_f.set_yscale("log")
    ax_f.set_ylabel("final tr(F̄)")
    ax_f.set_title("empirical Fisher trace at the end of training", fontsize=10)
    ax_acc.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _paired_panel(ax, selected, regimes, offset) -> None:
    """Per regime, each regularizer's mean paired test-accuracy difference to L2 only, with
    its standard error (only where at least two seeds are shared)."""
    for k, method in enumerate(METHODS[1:], start=1):
        xs, mean, se = [], [], []
        for i, regime in enumerate(regimes):
            diff = paired_difference(selected[regime].get(method, {}),
                                     selected[regime].get("L2 only", {}))
            if diff:
                xs.append(i + (k - 1.5) * offset)
                mean.append(diff[0])
                se.append(diff[1])
        if xs:
            ax.errorbar(xs, mean, yerr=se, capsize=3, color=COLORS[method], marker="os^D"[k],
                        linestyle="none", label=method)
    ax.axhline(0.0, color=COLORS["L2 only"], linewidth=1)
    ax.set_ylabel("Δ test accuracy vs L2 only (points)")
    ax.set_title("paired per-seed difference to L2 only (bars: standard error)", fontsize=10)


def final_selections(selected) -> List[dict]:
    """The selected configurations whose regime and method have run their whole budget."""
    return [e["config"] for regime in sorted(selected, key=_regime_order) for m in METHODS
            for e in [selected[regime].get(m, {})] if "config" in e and e["done"] == e["budget"]]


STUDIES = {  # study -> (table note, figure title)
    "regimes": (FAST_NOTE, "3×512 MLP on CIFAR-10, 40 epochs: when does the penalty help?"),
    "regimes-long": (LONG_NOTE, "3×512 MLP on CIFAR-10, 100 epochs, ZCA + crop/flip: the "
                                "selected regime"),
}


def _runs_and_out(src, out: Optional[Path]) -> tuple:
    """(runs, output folder, made if missing) of a store with a finished run; else StoreError."""
    db, runs, _ = load(src)
    out = Path(out) if out else db.parent / "report"
    if not any(r["status"] == "done" for r in runs):
        raise StoreError(f"{db} has no finished run yet ({len(runs)} runs stored); nothing to report")
    out.mkdir(parents=True, exist_ok=True)
    return runs, out


def make_regime_report(src, out: Optional[Path] = None, sharpness: Optional[Path] = None,
                       study: str = "regimes") -> Path:
    note, title = STUDIES[study]
    runs, out = _runs_and_out(src, out)
    if sharpness is None and (out / "sharpness").is_dir():
        sharpness = out / "sharpness"
    selected = select(runs)
    (out / "table.md").write_text(table(selected, digest(runs), sharpness_by_run(sharpness), note))
    chosen = final_selections(selected)
    (out / "selected.json").write_text(json.dumps(chosen, indent=1, sort_keys=True) + "\n")
    figure(selected, out / "regimes.png", title)
    return out


def ablation_rows(runs: List[dict]) -> List[dict]:
    """Per group_size m of the ablation store: its alpha, how many runs it has, and the seeds,
    test and validation accuracies and final tr(F_bar) of those done."""
    by_m = defaultdict(list)
    for r in runs:
        by_m[r["config"]["group_size"]].append(r)
    rows = []
    for m in sorted(by_m):
        done = sorted((r for r in by_m[m] if r["status"] == "done"), key=lambda r: r["config"]["seed"])
        rows.append(dict(m=m, alpha=by_m[m][0]["config"]["alpha"], runs=len(by_m[m]),
                         batch=by_m[m][0]["config"]["batch_size"],
                         seeds=[r["config"]["seed"] for r in done],
                         test=[r["summary"]["test_acc"] for r in done],
                         vals=[r["summary"]["val_acc"] for r in done],
                         fisher=[r["summary"]["fisher_trace"] for r in done]))
    return rows


def ablation_table(rows: List[dict], store_digest: str) -> str:
    lines = [f"Store digest: `{store_digest}`", "",
             "| group size m | α_m | test acc (%) | val acc (%) | seeds | final tr(F̄) | "
             "Δ test vs m = 1 (points, paired) |", "|---|---|---|---|---|---|---|"]
    first = rows[0] if rows and rows[0]["m"] == 1 else {}
    for row in rows:
        m = f"{row['m']} (N)" if row["m"] == row["batch"] else str(row["m"])
        if not row["test"]:
            lines.append(f"| {m} | {row['alpha']:.4g} | – | – | 0/{row['runs']} | – | – |")
            continue
        diff = paired_difference(row, first) if row["m"] != 1 else None
        lines.append(f"| {m} | {row['alpha']:.4g} | {_mean_sd(row['test'], 100)} | "
                     f"{_mean_sd(row['vals'], 100)} | {len(row['test'])}/{row['runs']} | "
                     f"{_mean_sd(row['fisher'], 1.0, 3)} | {_diff_cell(diff)} |")
    lines += ["", "curvature + L2 at the regime study's selected regime and configuration, with the "
              "penalty on groups of m examples (m = 1: per-example gradients, the paper's penalty; "
              "m = N: the gradient of the batch-mean loss). α_m = α_1 · R_1(θ₀) / R_m(θ₀) matches "
              "the penalty's size at initialization (`sweeps/make_regime_followups.py`). Accuracy "
              "at the end of training, mean ± std over the seeds done; Δ: mean ± standard error of "
              "the per-seed differences to m = 1."]
    return "\n".join(lines) + "\n"


def ablation_figure(rows: List[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r["test"]]
    fig, (ax_acc, ax_f) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["m"] for r in rows]
    acc = [statistics.mean(r["test"]) * 100 for r in rows]
    sd = [statistics.stdev(r["test"]) * 100 if len(r["test"]) > 1 else 0.0 for r in rows]
    ax_acc.errorbar(xs, acc, yerr=sd, capsize=3, marker="o", color=COLORS["curvature + L2"])
    ax_f.plot(xs, [statistics.mean(r["fisher"]) for r in rows], marker="o",
              color=COLORS["curvature + L2"])
    for ax in (ax_acc, ax_f):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{m}\n(N)" if r["m"] == r["batch"] else str(m) for m, r in zip(xs, rows)])
        ax.set_xlabel("group size m")
        ax.grid(alpha=0.3)
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_title("curvature + L2 (bars: std over seeds)", fontsize=10)
    ax_f.set_yscale("log")
    ax_f.set_ylabel("final tr(F̄)")
    ax_f.set_title("empirical Fisher trace at the end of training", fontsize=10)
    fig.suptitle("group-size ablation, α matched at initialization")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def make_ablation_report(src, out: Optional[Path] = None) -> Path:
    """table.md and ablation.png of the group_size ablation store."""
    runs, out = _runs_and_out(src, out)
    rows = ablation_rows(runs)
    (out / "table.md").write_text(ablation_table(rows, digest(runs)))
    ablation_figure(rows, out / "ablation.png")
    return out
