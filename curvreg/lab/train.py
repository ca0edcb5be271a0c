"""The trainer: SGD (+momentum/Nesterov) with L2 and curvature penalties, SAM and GNP baselines.

The objective of one step on a batch B is
    mean_{i in B} l_i + alpha_t * mean_{i in B} ||grad l_i||^2       (curvature; ``curvreg.tape``)
plus L2 through SGD's ``weight_decay``. A run is a directory: ``config.json``, ``metrics.jsonl``
(one line per epoch), ``summary.json`` and ``checkpoint.pt`` (written atomically each epoch, so
``--resume`` continues bit-for-bit on CPU). Under ``torchrun`` each rank takes an equal slice of
every global batch and gradients are averaged with ``torch.distributed.all_reduce``, which makes
the update that of single-process training on the global batch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import curvreg

from .config import ConfigError, TrainConfig, make_config
from .data import load_arrays
from .io import atomic_write, progress_bar, write_json, write_jsonl
from .loader import Splits, epoch_batches, prepare
from .models import build_model
from .sam import perturbed_gradient


class Diverged(RuntimeError):
    pass


CHECK_EVERY = 32  # steps between the host reads of the epoch sums (divergence check)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available; use cpu or auto")
    return torch.device(name)


def lr_at(cfg: TrainConfig, t: float) -> float:
    """Learning rate at fractional epoch ``t``."""
    if cfg.warmup_epochs and t < cfg.warmup_epochs:
        return cfg.lr * t / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        span = max(cfg.epochs - cfg.warmup_epochs, 1e-9)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, (t - cfg.warmup_epochs) / span)))
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(t >= m for m in cfg.milestones)
    return cfg.lr


def alpha_at(cfg: TrainConfig, t: float) -> float:
    if cfg.alpha_warmup_epochs and t < cfg.alpha_warmup_epochs:
        return cfg.alpha * t / cfg.alpha_warmup_epochs
    return cfg.alpha


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


STREAMS = ("shuffle", "probes")  # the random streams a run draws from, besides torch's global one


def derived_seed(seed: int, stream: str, index: int) -> int:
    """Independent 63-bit seed of ``stream``'s ``index``-th generator (an epoch, a rank) for a
    run seeded ``seed``, from numpy's SeedSequence: distinct (seed, stream, index) never share
    a seed, unlike affine formulas such as seed * K + epoch."""
    import numpy as np
    words = np.random.SeedSequence([seed, STREAMS.index(stream), index]).generate_state(2)
    return int((int(words[0]) << 32 | int(words[1])) >> 1)


def model_from_config(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    """The model a run of ``cfg`` trains (initialized from the current torch seed)."""
    kw = dict(num_classes=num_classes, activation=cfg.activation)
    if cfg.model == "allcnn":
        kw.update(width=cfg.width, dropout=cfg.dropout)
    elif cfg.model.startswith("resnet"):
        kw.update(width=cfg.width)
    return build_model(cfg.model, **kw)


def data_from_config(cfg: TrainConfig, device) -> Splits:
    """The normalized train/val/test tensors of a run of ``cfg`` on ``device``."""
    arrays = load_arrays(cfg.dataset, cfg.data_dir, download_ok=cfg.download)
    return prepare(arrays, val_size=cfg.val_size, split_seed=cfg.split_seed,
                   train_subset=cfg.train_subset, normalization=cfg.normalization,
                   zca_eps=cfg.zca_eps, coarse=cfg.coarse_labels, device=device)


class Trainer:
    """Builds data and model from a config and runs epochs, writing the run directory."""

    def __init__(self, cfg: TrainConfig, out: Path, progress: Optional[bool] = None,
                 tensorboard: bool = False):
        self.cfg, self.out = cfg, Path(out)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.device = resolve_device(cfg.device)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.data = data_from_config(cfg, self.device)
        self._check_slices()
        torch.manual_seed(cfg.seed)
        self.model = model_from_config(cfg, self.data.num_classes).to(self.device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        self.epoch, self.history, self.resumes = 0, [], []
        self.tensorboard, self.scalars = tensorboard, None
        # Probe draws for estimator probe/hybrid; separate from the data RNG so that switching
        # estimator leaves the data order unchanged.
        self.probe_gen = torch.Generator(device=self.device).manual_seed(
            derived_seed(cfg.seed, "probes", self.rank))

    def _check_slices(self) -> None:
        """Under torchrun every rank needs at least one example of every batch."""
        n, b = self.data.x_train.shape[0], self.cfg.batch_size
        smallest = min(b, n % b or b, n)
        if self.world > 1 and smallest < self.world:
            raise ConfigError(f"a batch of {smallest} example(s) cannot be split over {self.world} "
                              f"processes ({n} training examples, batch_size {b}); change "
                              "batch_size or train_subset")

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "epoch": self.epoch, "history": self.history, "resumes": self.resumes,
                "rng": torch.get_rng_state(),
                "probe_rng": self.probe_gen.get_state()}

    def save_checkpoint(self) -> None:
        if self.rank == 0:
            path = self.out / "checkpoint.pt"
            atomic_write(path, lambda f: torch.save(self.state(), f))

    def load_checkpoint(self) -> None:
        state = torch.load(self.out / "checkpoint.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.epoch, self.history = state["epoch"], state["history"]
        self.resumes = state.get("resumes", []) + [{"from_epoch": self.epoch, "epochs": self.cfg.epochs}]
        torch.set_rng_state(state["rng"])
        if "probe_rng" in state:
            self.probe_gen.set_state(state["probe_rng"].cpu())
        self._write_metrics()

    def _write_metrics(self) -> None:
        if self.rank == 0:
            write_jsonl(self.out / "metrics.jsonl", self.history)

    # ------------------------------------------------------------------ steps
    def _objective(self, x, y, alpha: float) -> curvreg.Objective:
        """The penalized objective of this rank's slice (curvreg.penalized_objective)."""
        cfg = self.cfg
        return curvreg.penalized_objective(
            self.model, x, y, alpha, autocast=torch.bfloat16 if cfg.bf16 else None,
            estimator=cfg.curvature_estimator, num_probes=cfg.num_probes,
            generator=self.probe_gen, distribution=cfg.probe_distribution,
            batch_norm=cfg.batch_norm, group_size=cfg.group_size)

    def step(self, x, y, t: float) -> dict:
        cfg, alpha = self.cfg, alpha_at(self.cfg, t)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(cfg, t)
        n_global = x.shape[0]
        lo, hi = self._slices(n_global)[self.rank]
        xs, ys = x[lo:hi], y[lo:hi]
        weight = (hi - lo) / n_global  # local mean -> share of the global mean

        def closure() -> curvreg.Objective:
            obj = self._objective(xs, ys, alpha)
            self.opt.zero_grad(set_to_none=True)
            (obj.value * weight).backward()
            if self.world > 1:
                for p in self.model.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
            return obj

        if cfg.method == "sgd":
            obj = closure()
        else:
            obj = perturbed_gradient(self.model.parameters(), closure, cfg.rho,
                                     beta=1.0 if cfg.method == "sam" else cfg.gnp_beta)
        self.opt.step()
        # Device-side sums only (no host sync in the step): loss, correct, penalty, and whether
        # the objective was non-finite; run_epoch reads them every CHECK_EVERY steps.
        with torch.no_grad():
            losses, sq = obj.losses, obj.sq_norms
            zero = losses.new_zeros(())
            stats = torch.stack([losses.sum(), (obj.output.argmax(1) == ys).sum().float(),
                                 sq.sum() if sq is not None else zero,
                                 (~torch.isfinite(obj.value)).float()])
            if self.world > 1:
                dist.all_reduce(stats)
        m = cfg.group_size
        n_sq = sum((b - a) // m for a, b in self._slices(n_global)) if sq is not None else 0
        return {"stats": stats, "n": n_global, "n_sq": n_sq, "lr": self.opt.param_groups[0]["lr"],
                "alpha": alpha}

    def _slices(self, n: int):
        """(lo, hi) of each rank's slice of a global batch of ``n``."""
        return [(r * n // self.world, (r + 1) * n // self.world) for r in range(self.world)]

    # ------------------------------------------------------------------ epochs
    @torch.no_grad()
    def evaluate(self, x, y, batch: int = 1000) -> Dict[str, Optional[float]]:
        """Mean loss and accuracy in eval mode (restored afterwards, also on an error); None
        for an empty split (``val_size: 0``), never a made-up 0."""
        if x.shape[0] == 0:
            return {"loss": None, "acc": None}
        loss = correct = 0.0
        with curvreg.model_mode(self.model, "eval"):
            for i in range(0, x.shape[0], batch):
                out = self.model(x[i:i + batch]).float()
                loss += F.cross_entropy(out, y[i:i + batch], reduction="sum").item()
                correct += (out.argmax(1) == y[i:i + batch]).sum().item()
        return {"loss": loss / x.shape[0], "acc": correct / x.shape[0]}

    def fisher_trace(self) -> float:
        """Empirical Fisher trace mean_i ||grad l_i||^2 on the first training examples, in eval
        mode (running BatchNorm statistics, no dropout): the model as it is evaluated."""
        n = min(self.cfg.fisher_eval_size, self.data.x_train.shape[0])
        batches = [(self.data.x_train[i:min(n, i + 256)], self.data.y_train[i:min(n, i + 256)])
                   for i in range(0, n, 256)]
        ce = lambda out, y: F.cross_entropy(out.float(), y, reduction="none")  # noqa: E731
        return curvreg.empirical_fisher_trace(self.model, ce, batches, mode="eval")

    def run_epoch(self) -> dict:
        cfg, d = self.cfg, self.data
        gen = torch.Generator().manual_seed(derived_seed(cfg.seed, "shuffle", self.epoch))
        # the last, partial batch is cut to whole groups of group_size examples (the penalty is
        # over groups), and left out when it holds none; with group_size 1 it is kept whole
        m, n_train = cfg.group_size, d.x_train.shape[0]
        tail = n_train % cfg.batch_size
        steps = n_train // cfg.batch_size + (tail >= m)
        sums = torch.zeros(4, device=self.device)
        n = n_sq = 0
        start = time.perf_counter()
        bar = progress_bar(steps, f"epoch {self.epoch + 1}/{cfg.epochs}", self.progress and self.rank == 0)
        info = {}
        for k, (x, y) in enumerate(epoch_batches(d.x_train, d.y_train, cfg.batch_size, gen,
                                                  do_augment=cfg.augment)):
            if k == steps:
                break
            if x.shape[0] % m:
                x, y = x[:x.shape[0] - x.shape[0] % m], y[:x.shape[0] - x.shape[0] % m]
            info = self.step(x, y, self.epoch + k / steps)
            sums += info["stats"]
            n, n_sq = n + info["n"], n_sq + info["n_sq"]
            bar.update(1)
            if (k + 1) % CHECK_EVERY == 0 or k + 1 == steps:
                bad = int(sums[3].item())  # the only host sync of the loop
                if bad:
                    bar.close()
                    raise Diverged(f"non-finite objective in {bad} step(s) of epoch {self.epoch + 1} "
                                   f"(by step {k + 1} of {steps})")
        bar.close()
        seconds = time.perf_counter() - start
        loss_sum, correct, sq_sum, _ = sums.tolist()
        val, test = self.evaluate(d.x_val, d.y_val), self.evaluate(d.x_test, d.y_test)
        self.epoch += 1
        return {"epoch": self.epoch, "train_loss": loss_sum / n, "train_acc": correct / n,
                "val_loss": val["loss"], "val_acc": val["acc"],
                "test_loss": test["loss"], "test_acc": test["acc"],
                "fisher_trace": self.fisher_trace(),
                # mean over the steps that computed the penalty (alpha > 0), per example or group
                "train_sq_grad_norm": sq_sum / n_sq if n_sq else None,
                "lr": info.get("lr"), "alpha": info.get("alpha"),
                "epoch_seconds": seconds, "examples_per_second": n / seconds}

    def _log_scalars(self, metrics: dict) -> None:
        """TensorBoard scalars of one epoch (``<run>/tensorboard``), beside metrics.jsonl."""
        if not self.tensorboard or self.rank != 0:
            return
        if self.scalars is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("--tensorboard needs the tensorboard package: pip install -e "
                                  "'.[tensorboard]'") from e
            # after a resume, drop events the interrupted run wrote past its last checkpoint
            self.scalars = SummaryWriter(str(self.out / "tensorboard"), purge_step=metrics["epoch"])
        for k, v in metrics.items():
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.scalars.add_scalar(k, v, metrics["epoch"])
        self.scalars.flush()

    def fit(self) -> dict:
        """Train to ``cfg.epochs``; returns the summary (also written to ``summary.json``)."""
        status = "done"
        try:
            while self.epoch < self.cfg.epochs:
                metrics = self.run_epoch()
                bad = [k for k in ("train_loss", "val_loss", "fisher_trace")
                       if metrics[k] is not None and not math.isfinite(metrics[k])]
                if bad:
                    raise Diverged(f"non-finite {', '.join(bad)} after epoch {metrics['epoch']}")
                self.history.append(metrics)
                self.save_checkpoint()
                self._write_metrics()
                self._log_scalars(metrics)
                if self.rank == 0 and not self.progress:
                    shown = {k: "-" if metrics[k] is None else f"{metrics[k]:.4f}"
                             for k in ("train_acc", "val_acc", "test_acc")}
                    print(f"epoch {metrics['epoch']}: " + " ".join(f"{k} {v}" for k, v in shown.items())
                          + f" fisher {metrics['fisher_trace']:.4g}", flush=True)
        except Diverged as e:
            status = "diverged"
            print(f"run diverged: {e}", file=sys.stderr)
        finally:
            if self.scalars is not None:
                self.scalars.close()
        return self.write_summary(status)

    def write_summary(self, status: str) -> dict:
        last = self.history[-1] if self.history else {}
        scored = [m for m in self.history if m["val_acc"] is not None]
        best = max(scored, key=lambda m: m["val_acc"]) if scored else {}
        summary = {
            "status": status, "epochs_done": self.epoch, "seed": self.cfg.seed,
            "test_acc": last.get("test_acc"), "val_acc": last.get("val_acc"),
            "train_acc": last.get("train_acc"), "fisher_trace": last.get("fisher_trace"),
            "best_val_acc": best.get("val_acc"), "best_val_epoch": best.get("epoch"),
            "test_acc_at_best_val": best.get("test_acc"),
            "config": dataclasses.asdict(self.cfg),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "curvreg": curvreg.__version__},
            "git_commit": _git_commit(), "world_size": self.world,
            "resumes": self.resumes,  # each --resume: the epoch it continued from, the target
        }
        if self.rank == 0:
            write_json(self.out / "summary.json", summary)
        return summary


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("CURVREG_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def train(overrides: dict, out: Path, progress: Optional[bool] = None,
          tensorboard: bool = False) -> dict:
    """Start a new run in ``out`` from config overrides."""
    _init_distributed()
    cfg = make_config(overrides)
    out = Path(out)
    if (out / "checkpoint.pt").exists():
        raise FileExistsError(f"{out} already holds a run; use --resume {out} to continue it, or "
                              "choose another --out")
    trainer = Trainer(cfg, out, progress, tensorboard)  # bad data fails here, before any file
    out.mkdir(parents=True, exist_ok=True)
    if trainer.rank == 0:
        write_json(out / "config.json", dataclasses.asdict(cfg))
    return trainer.fit()


def resume(run_dir: Path, progress: Optional[bool] = None, epochs: Optional[int] = None,
           tensorboard: bool = False) -> dict:
    """Continue the run in ``run_dir`` from its last checkpoint (bit for bit on the CPU).

    ``epochs`` extends (or shortens) a constant or step schedule; a cosine schedule is refused,
    since its learning rate depends on the total. ``config.json`` is rewritten with the new
    total and ``summary.json`` lists every resume (``resumes``)."""
    _init_distributed()
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json; is it a curvreg run directory?")
    values = json.loads((run_dir / "config.json").read_text())
    if epochs is not None and epochs != values["epochs"]:
        if values.get("schedule") == "cosine":
            raise ConfigError(f"--epochs {epochs} on resume would re-stretch this run's cosine "
                              f"schedule (set for {values['epochs']} epochs) and make the learning "
                              "rate jump; only constant and step schedules can be extended. Start "
                              "a new run instead.")
        values["epochs"] = epochs
        write_json(run_dir / "config.json", dataclasses.asdict(make_config(values)))
    trainer = Trainer(make_config(values), run_dir, progress, tensorboard)
    if (run_dir / "checkpoint.pt").is_file():
        trainer.load_checkpoint()
    return trainer.fit()
