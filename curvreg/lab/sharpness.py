"""``curvreg sharpness``: Hessian and Fisher traces of a saved run, with error bars.

All quantities refer to the mean cross-entropy L = mean_i l_i over the first ``subset`` examples
of the run's training split (same normalization, no augmentation), with the model in eval mode
(``--batch-norm frozen|unbiased``: its BatchNorms normalize with each batch's statistics
instead, and tr(F_bar) carries a standard error under ``unbiased``):

    tr(H)      Hutchinson over exact HVPs, +- standard error over probes
    tr(F_bar)  exact mean_i ||grad l_i||^2 (the curvature penalty R)
    tr(F)      exact sum over labels weighted by softmax(f(x)) (default for <= 10 classes), or
               Monte Carlo over labels y ~ softmax(f(x)), +- standard error over label draws
    lambda_k   top-k Hessian eigenvalues (Lanczos), with residuals ||H u - lambda u||

Ratios carry first-order propagated errors: for r = a / b, se(r) = |r| sqrt((se_a/a)^2 + (se_b/b)^2).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import curvreg
from curvreg import batchnorm

from .config import ConfigError, make_config
from .io import progress_bar, write_json
from .train import data_from_config, model_from_config, resolve_device


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def load_run(path: Path, device: str = "auto", data_dir: Optional[str] = None):
    """(config, model with the checkpoint's weights, data splits) of a run directory or checkpoint."""
    path = Path(path)
    run_dir = path.parent if path.is_file() else path
    ckpt = path if path.is_file() else path / "checkpoint.pt"
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json; pass a curvreg run directory or its "
                                "checkpoint.pt")
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt} does not exist; the run has not finished an epoch yet")
    values = json.loads((run_dir / "config.json").read_text())
    if data_dir is not None:
        values["data_dir"] = data_dir
    values["device"] = device
    cfg = make_config(values)
    dev = resolve_device(cfg.device)
    data = data_from_config(cfg, dev)
    model = model_from_config(cfg, data.num_classes).to(dev)
    state = torch.load(ckpt, map_location=dev, weights_only=False)
    model.load_state_dict(state["model"])
    return cfg, model, data, int(state.get("epoch", 0))


def _ratio(a, sa, b, sb) -> dict:
    return {"value": a / b, "stderr": math.sqrt((sa / b) ** 2 + (a * sb / b ** 2) ** 2)}


def measure(model, batches, *, probes: int = 100, fisher_samples: int = 16, eigs: int = 3,
            eig_tol: float = 1e-3, eig_iters: int = 200, seed: int = 0, progress: bool = False,
            fisher_labels: str = "auto", batch_norm: Optional[str] = None) -> dict:
    """All sharpness quantities of ``model`` (put in eval mode for the duration; with
    ``batch_norm``, its BatchNorms in training mode) on ``batches``."""
    gen = lambda k: torch.Generator().manual_seed(seed * 7919 + k)  # noqa: E731
    out, start = {}, time.perf_counter()
    with curvreg.model_mode(model, "eval"):
        if batch_norm is not None:
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.train()
        params = [p for p in model.parameters() if p.requires_grad]
        dim = sum(p.numel() for p in params)
        bar = progress_bar(probes, "hessian trace", progress)

        def quadratic(v):
            bar.update(1)
            return curvreg.hessian_quadratic_form(model, ce, batches, v)

        h = curvreg.hutchinson_trace(None, dim, probes, generator=gen(1), dtype=params[0].dtype,
                                     device=params[0].device, quadratic=quadratic)
        bar.close()
        stage = lambda what: progress and print(f"sharpness: {what}", file=sys.stderr, flush=True)  # noqa: E731
        stage("empirical Fisher trace")
        fbar = curvreg.empirical_fisher_trace(model, ce, batches, batch_norm=batch_norm,
                                              generator=gen(4))
        fbar_se = getattr(fbar, "stderr", 0.0)
        fbar = float(fbar)
        if fisher_labels == "auto" and batch_norm == "unbiased":
            fisher_labels = "sample"  # the exact label sum has no error bar for the probes
        if fisher_labels == "auto":
            with torch.no_grad():
                classes = model(batches[0][0][:1]).shape[1]
            fisher_labels = "all" if classes <= 10 else "sample"
        stage(f"Fisher trace ({fisher_labels} labels)")
        fish = curvreg.fisher_trace(model, batches, num_samples=fisher_samples, generator=gen(2),
                                    labels=fisher_labels, batch_norm=batch_norm)
        stage(f"top {eigs} Hessian eigenvalues (Lanczos, tol {eig_tol:g}, at most {eig_iters} "
              "iterations)")
        top = curvreg.top_hessian_eigenvalues(model, ce, batches, k=eigs, tol=eig_tol,
                                              max_iter=eig_iters, generator=gen(3))
        with torch.no_grad():
            logits = [(model(x), y) for x, y in batches]
    n = sum(len(y) for _, y in logits)
    out.update({
        "num_params": dim,
        "loss": sum(ce(o, y).sum().item() for o, y in logits) / n,
        "accuracy": sum((o.argmax(1) == y).sum().item() for o, y in logits) / n,
        "hessian_trace": {"value": h.value, "stderr": h.stderr, "num_probes": h.num_probes},
        "empirical_fisher_trace": fbar, "empirical_fisher_trace_stderr": fbar_se,
        "batch_norm": batch_norm or "eval",
        "fisher_trace": {"value": fish.value, "stderr": fish.stderr, "labels": fisher_labels,
                         "num_samples" if fisher_labels == "sample" else "num_classes": fish.num_probes},
        "top_eigenvalues": top.eigenvalues, "eigen_residuals": top.residuals,
        "eigen_iterations": top.iterations, "eigen_converged": top.converged,
        "ratios": {"empirical_fisher/hessian": _ratio(fbar, fbar_se, h.value, h.stderr),
                   "fisher/hessian": _ratio(fish.value, fish.stderr, h.value, h.stderr)},
    })
    out["seconds"] = time.perf_counter() - start
    return out


def table(res: dict) -> str:
    h, f, r = res["hessian_trace"], res["fisher_trace"], res["ratios"]
    rows = [("tr(H)", f"{h['value']:.5g} +- {h['stderr']:.2g}  ({h['num_probes']} probes)"),
            ("tr(F_bar)", f"{res['empirical_fisher_trace']:.5g} +- "
                          f"{res['empirical_fisher_trace_stderr']:.2g} (unbiased estimate)"
             if res.get("empirical_fisher_trace_stderr") else
             f"{res['empirical_fisher_trace']:.5g} (exact)"),
            ("tr(F)", f"{f['value']:.5g} +- {f['stderr']:.2g}  ({f['num_samples']} label draws)"
             if f["labels"] == "sample" else f"{f['value']:.5g} (exact sum over {f['num_classes']} labels)"),
            ("top eigenvalues", ", ".join(f"{e:.5g}" for e in res["top_eigenvalues"])),
            ("tr(F_bar)/tr(H)", "{value:.4g} +- {stderr:.2g}".format(**r["empirical_fisher/hessian"])),
            ("tr(F)/tr(H)", "{value:.4g} +- {stderr:.2g}".format(**r["fisher/hessian"])),
            ("loss / accuracy", f"{res['loss']:.4g} / {res['accuracy']:.4f}")]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def run_sharpness(path, *, data_dir=None, subset: int = 2048, batch_size: int = 512,
                  probes: int = 100, fisher_samples: int = 16, eigs: int = 3, seed: int = 0,
                  device: str = "auto", out: Optional[Path] = None, progress: bool = False,
                  fisher_labels: str = "auto", batch_norm: Optional[str] = None,
                  eig_tol: float = 1e-3, eig_iters: int = 200) -> dict:
    """Evaluate a saved run and write ``sharpness.json`` (into the run directory by default)."""
    if batch_norm is not None and batch_norm not in batchnorm.MODES:
        raise ConfigError(f"--batch-norm must be one of {batchnorm.MODES}, got {batch_norm!r}")
    if batch_norm == "unbiased" and fisher_labels == "all":
        raise ConfigError("--fisher-labels all is exact and has no error bar; with --batch-norm "
                          "unbiased use sample (or auto)")
    for name, value, low in (("--subset", subset, 1), ("--batch-size", batch_size, 1),
                             ("--probes", probes, 2), ("--fisher-samples", fisher_samples, 2),
                             ("--eigs", eigs, 1)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    if fisher_labels not in ("auto", "all", "sample"):
        raise ConfigError(f"--fisher-labels must be auto, all or sample, got {fisher_labels!r}")
    cfg, model, data, epoch = load_run(path, device, data_dir)
    n = min(subset, data.x_train.shape[0])
    batches = [(data.x_train[i:min(n, i + batch_size)], data.y_train[i:min(n, i + batch_size)])
               for i in range(0, n, batch_size)]
    res = {"source": str(path), "epoch": epoch, "num_examples": n, "split": "train",
           "mode": "eval" if batch_norm is None else "eval, BatchNorm with batch statistics",
           "seed": seed, "model": cfg.model, "dataset": cfg.dataset,
           "alpha": cfg.alpha, "weight_decay": cfg.weight_decay}
    res.update(measure(model, batches, probes=probes, fisher_samples=fisher_samples, eigs=eigs,
                       seed=seed, progress=progress, fisher_labels=fisher_labels,
                       batch_norm=batch_norm, eig_tol=eig_tol, eig_iters=eig_iters))
    path = Path(path)
    target = Path(out) if out else (path.parent if path.is_file() else path) / "sharpness.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, res)
    res["written_to"] = str(target)
    return res
