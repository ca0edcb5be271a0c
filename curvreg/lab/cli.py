"""``curvreg`` command line: ``curvreg train|sharpness|sweep|report ...``; see ``curvreg --help``."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import time
import typing
from pathlib import Path

from curvreg import batchnorm

from .config import ConfigError, TrainConfig, choices, field_types, load_config_file
from .data import DataError
from .exitcodes import Exit
from .regime_report import STUDIES as REGIME_STUDIES, make_ablation_report, make_regime_report
from .sweep.backends import BACKENDS
from .sweep.store import StoreError, StoreLocked

class _Parser(argparse.ArgumentParser):
    """No abbreviations (``--epoch`` is not ``--epochs``); a misspelled flag gets a suggestion."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        bad = [w for w in message.replace(",", " ").split() if w.startswith("--")]
        parsers = [self] + [sp for a in self._actions if isinstance(a, argparse._SubParsersAction)
                            for sp in a.choices.values()]
        known = sorted({o for q in parsers for a in q._actions for o in a.option_strings})
        hints = [f"{b} -> {close[0]}?" for b in bad
                 for close in [difflib.get_close_matches(b.split("=")[0], known, n=1)] if close]
        super().error(message + (f" (did you mean: {', '.join(hints)})" if hints else ""))


def _config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, typed and documented by the field's declaration."""
    types = field_types()
    for f in dataclasses.fields(TrainConfig):
        typ, text, allowed = types[f.name], f.metadata["help"], choices(types[f.name])
        if allowed:
            text += f" ({', '.join(map(str, allowed))})"
        flag = "--" + f.name.replace("_", "-")
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if typ is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=text)
        elif typing.get_origin(typ) is list:
            p.add_argument(flag, dest=f.name, type=args[0], nargs="*", default=None, help=text)
        else:
            base = type(allowed[0]) if allowed else (args[0] if args else typ)
            p.add_argument(flag, dest=f.name, type=base, default=None, help=text)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train one model (curvature + L2 by default)",
                       description="Train a model; writes config.json, metrics.jsonl, "
                                   "summary.json and checkpoint.pt to --out.")
    _config_flags(p)
    p.add_argument("--config", help="YAML or JSON file of config fields (flags override it)")
    p.add_argument("--out", type=Path, help="run directory (default runs/<preset or model>-<time>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its checkpoint")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: only on a terminal)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars to RUN_DIR/tensorboard (needs the "
                        "tensorboard extra)")


def _sharpness_parser(sub) -> None:
    p = sub.add_parser("sharpness", help="Hessian/Fisher traces and top eigenvalues of a saved run",
                       description="Evaluate a saved model on (a subset of) its training split in "
                                   "eval mode; prints a table and writes sharpness.json.")
    p.add_argument("run", type=Path, metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--data-dir", "--data", dest="data_dir",
                   help="dataset directory, as for train (default: the run's, else $CURVREG_DATA)")
    p.add_argument("--subset", type=int, default=2048, help="first N training examples (default 2048)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--probes", type=int, default=100, help="Hutchinson probes for tr(H) (default 100)")
    p.add_argument("--fisher-labels", default="auto",
                   help="tr(F) by exact sum over 'all' labels or 'sample'd labels (default auto: "
                        "all for <= 10 classes)")
    p.add_argument("--fisher-samples", type=int, default=16, help="label draws for tr(F) when "
                                                                  "sampling (default 16)")
    p.add_argument("--eigs", type=int, default=3, help="top Hessian eigenvalues (default 3)")
    p.add_argument("--eig-tol", type=float, default=1e-3,
                   help="Lanczos stops when every residual <= tol * max(1, |lambda|) (default 1e-3)")
    p.add_argument("--eig-iters", type=int, default=200, help="Lanczos iterations at most (default "
                                                              "200; the result says if it converged)")
    p.add_argument("--batch-norm", choices=batchnorm.MODES,
                   help="measure with BatchNorm normalizing by each batch's statistics (training "
                        "mode) instead of its running ones; see GradNormTape(batch_norm=...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, help="output file (default RUN_DIR/sharpness.json)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)


def _sweep_parsers(sub) -> None:
    p = sub.add_parser("sweep", help="run or resume a grid of training runs",
                       description="Run every point of a YAML/JSON sweep spec; re-running resumes.")
    p.add_argument("spec", type=Path, metavar="SPEC")
    p.add_argument("--workers", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per run (default cores // workers)")
    p.add_argument("--backend", default="local", choices=BACKENDS,
                   help="local processes (default) or Ray tasks")
    p.add_argument("--address", help="Ray cluster address (default: start or join a local one)")
    p.add_argument("--db", type=Path, help="SQLite store (default <spec folder>/<spec name>/sweep.db, e.g. sweeps/fc512-fig1/sweep.db for sweeps/fc512-fig1.yaml)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--retry-failed", action="store_true",
                   help="give the failed runs a fresh max_attempts (after fixing their cause)")
    r = sub.add_parser("report", help="tables and figures from a sweep store",
                       description="Write table.md, runs.csv, figures and index.md from a sweep.")
    r.add_argument("src", type=Path, metavar="SWEEP_DB_OR_DIR")
    r.add_argument("--out", type=Path, help="output folder (default: report/ beside the store)")
    r.add_argument("--select-seed", type=int, help="choose each column's setting by this seed's "
                                                   "validation accuracy only (default: mean over seeds)")
    r.add_argument("--study", choices=("paper", *REGIME_STUDIES, "ablation"), default="paper",
                   help="paper: Tables 1-2 and Figures 1-2 (default); regimes: the regime table "
                        "and figure of sweeps/make_regimes_spec.py; regimes-long and ablation: "
                        "its two follow-ups (sweeps/make_regime_followups.py)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="curvreg", description="Curvature regularization toolkit.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _train_parser(sub)
    _sharpness_parser(sub)
    _sweep_parsers(sub)
    return ap


def _overrides(args) -> dict:
    values = load_config_file(args.config) if args.config else {}
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    values.update({k: getattr(args, k) for k in names if getattr(args, k) is not None})
    return values


def cmd_train(args) -> int:
    from .train import resume, train
    if args.resume is not None:
        extra = _overrides(args)
        unsupported = sorted(set(extra) - {"epochs"})
        if unsupported:
            raise ConfigError(f"--resume continues the stored config; only --epochs may change "
                              f"(got {unsupported})")
        summary = resume(args.resume, args.progress, extra.get("epochs"), args.tensorboard)
        out = args.resume
    else:
        values = _overrides(args)
        name = values.get("preset") or values.get("model") or "run"
        out = args.out or Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        summary = train(values, out, args.progress, args.tensorboard)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        print(json.dumps({k: summary[k] for k in ("status", "epochs_done", "test_acc",
                                                  "best_val_acc", "fisher_trace")}))
        print(f"results in {out}")
    return Exit.DIVERGED if summary["status"] == "diverged" else Exit.OK


def cmd_sharpness(args) -> int:
    from .sharpness import run_sharpness, table
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    res = run_sharpness(args.run, data_dir=args.data_dir, subset=args.subset,
                        batch_size=args.batch_size, probes=args.probes,
                        fisher_samples=args.fisher_samples, fisher_labels=args.fisher_labels,
                        eigs=args.eigs, eig_tol=args.eig_tol, eig_iters=args.eig_iters,
                        seed=args.seed, batch_norm=args.batch_norm,
                        device=args.device, out=args.out, progress=progress)
    print(f"{res['model']} on {res['num_examples']} {res['dataset']} training examples, "
          f"epoch {res['epoch']}, {res['mode']}")
    print(table(res))
    print(f"written to {res['written_to']}")
    return Exit.OK


def cmd_sweep(args) -> int:
    from .sweep import run_sweep
    counts = run_sweep(args.spec, workers=args.workers, backend=args.backend, db=args.db,
                       address=args.address, progress=args.progress, threads=args.threads,
                       retry_failed=args.retry_failed)
    print(json.dumps(counts))
    return Exit.OK if counts["pending"] == counts["running"] == counts["failed"] == 0 else Exit.FAILED


def cmd_report(args) -> int:
    if args.study == "ablation":
        out = make_ablation_report(args.src, args.out)
        print(f"ablation report in {out} (open {out / 'table.md'})")
        return Exit.OK
    if args.study in REGIME_STUDIES:
        out = make_regime_report(args.src, args.out, study=args.study)
        print(f"regime report in {out} (open {out / 'table.md'})")
        return Exit.OK
    from .report import make_report
    out = make_report(args.src, args.out, args.select_seed)
    print(f"report in {out} (open {out / 'index.md'})")
    return Exit.OK


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "sharpness": cmd_sharpness, "sweep": cmd_sweep,
                "report": cmd_report}[args.command](args)
    except StoreLocked as e:
        print(f"curvreg {args.command}: error: {e}", file=sys.stderr)
        return Exit.LOCKED
    except (ConfigError, DataError, StoreError, FileExistsError, FileNotFoundError) as e:
        print(f"curvreg {args.command}: error: {e}", file=sys.stderr)
        return Exit.BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
