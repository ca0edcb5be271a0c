"""Trainer on a real CIFAR-10 subset: learning, resume, divergence, alpha=0, CLI, DDP."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from curvreg.lab import train as train_mod
from curvreg.lab.cli import main
from curvreg.lab.exitcodes import Exit
from curvreg.lab.config import PRESETS, ConfigError, make_config
from curvreg.lab.models import MODELS
from curvreg.lab.loader import epoch_batches

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("CURVREG_DATA", str(ROOT.parent / "shared" / "data"))
pytestmark = pytest.mark.skipif(not Path(DATA, "cifar10.npz").is_file(), reason="no CIFAR-10 copy")
QUICK = dict(preset="fc512-cifar10", train_subset=512, val_size=500, batch_size=128, data_dir=DATA,
             fisher_eval_size=128)
TIMING = {"epoch_seconds", "examples_per_second"}


def metrics(run):
    lines = Path(run, "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]


def test_loss_decreases_and_files_written(tmp_path):
    s = train_mod.train({**QUICK, "epochs": 3, "lr": 0.05}, tmp_path / "r", progress=False)
    m = metrics(tmp_path / "r")
    assert s["status"] == "done" and s["epochs_done"] == 3
    assert s["test_acc"] == m[-1]["test_acc"] and s["best_val_acc"] == max(x["val_acc"] for x in m)
    assert m[-1]["train_acc"] > 0.2  # 10 classes: well above chance after 3 epochs
    assert m[-1]["train_loss"] < m[0]["train_loss"]
    assert all(x["fisher_trace"] > 0 and x["train_sq_grad_norm"] > 0 for x in m)
    for f in ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (tmp_path / "r" / f).is_file()
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["config"]["alpha"] == 5e-4 and "torch" in summary["versions"]


@pytest.mark.parametrize("estimator", ["exact", "probe"])
def test_resume_after_kill_equals_uninterrupted(tmp_path, monkeypatch, estimator):
    cfg = {**QUICK, "epochs": 3, "augment": True, "curvature_estimator": estimator}
    train_mod.train(cfg, tmp_path / "full", progress=False)
    real = train_mod.Trainer.run_epoch

    def dying(self):
        if self.epoch == 2:
            raise KeyboardInterrupt  # killed during the third epoch
        return real(self)

    monkeypatch.setattr(train_mod.Trainer, "run_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(train_mod.Trainer, "run_epoch", real)
    assert len(metrics(tmp_path / "cut")) == 2
    train_mod.resume(tmp_path / "cut", progress=False)
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["curvature_estimator"] == estimator
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_divergence_recorded_with_exit_code(tmp_path, capsys):
    code = main(["train", "--preset", "fc512-cifar10", "--train-subset", "256", "--val-size", "100",
                 "--epochs", "2", "--lr", "1e6", "--data-dir", DATA, "--out", str(tmp_path / "d")])
    assert code == Exit.DIVERGED == 3
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["status"] == "diverged"
    assert "Traceback" not in capsys.readouterr().err


def test_alpha_zero_is_plain_sgd(tmp_path):
    cfg = {**QUICK, "epochs": 1, "alpha": 0.0, "schedule": "constant", "lr": 0.05}
    trainer = train_mod.Trainer(make_config(cfg), tmp_path, progress=False)
    torch.manual_seed(0)
    ref = train_mod.build_model("fc512", num_classes=10)
    ref.load_state_dict(trainer.model.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(train_mod.derived_seed(0, "shuffle", 0))
    for x, y in epoch_batches(trainer.data.x_train, trainer.data.y_train, 128, gen):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
    trainer.run_epoch()
    for p, q in zip(trainer.model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)


def test_sam_and_gnp_in_the_trainer(tmp_path):
    """GNP with beta = 1 is SAM and with beta = 0 plain SGD, step for step (bit for bit); the
    update itself is checked by hand in test_objective.py."""
    def run(name, **kw):
        train_mod.train({**QUICK, "epochs": 2, "alpha": 0.0, **kw}, tmp_path / name, progress=False)
        return torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["model"]

    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    sam, gnp1 = run("sam", method="sam"), run("gnp1", method="gnp", gnp_beta=1.0)
    sgd, gnp0 = run("sgd"), run("gnp0", method="gnp", gnp_beta=0.0)
    assert same(sam, gnp1) and same(sgd, gnp0) and not same(sam, sgd)
    m = metrics(tmp_path / "sam")
    assert m[1]["train_loss"] < m[0]["train_loss"]


def test_logged_penalty_averages_only_the_steps_that_computed_it(tmp_path, monkeypatch):
    """Under alpha warm-up the first step has alpha = 0 and no penalty; the logged mean must not
    count it as a zero. With group_size m the mean is over groups."""
    seen = []
    real = train_mod.Trainer.step

    def spy(self, x, y, t):
        info = real(self, x, y, t)
        seen.append((info["stats"][2].item(), info["n"], info["n_sq"]))
        return info

    monkeypatch.setattr(train_mod.Trainer, "step", spy)
    train_mod.train({**QUICK, "epochs": 1, "alpha_warmup_epochs": 1.0, "group_size": 4},
                    tmp_path / "r", progress=False)
    assert seen[0][0] == 0.0 and seen[0][2] == 0 and all(s[2] == s[1] / 4 for s in seen[1:])
    want = sum(s[0] for s in seen) / sum(s[2] for s in seen)
    assert metrics(tmp_path / "r")[0]["train_sq_grad_norm"] == pytest.approx(want, rel=1e-6)  # float32 sums


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="'lr' must be float"):
        make_config({"lr": "fast"})
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['lrr'\]"):
        make_config({"lrr": 0.1})
    with pytest.raises(ConfigError, match="'method' must be one of"):
        make_config({"method": "adam"})
    with pytest.raises(ConfigError, match="'preset' must be one of .*got 'fc9'"):
        make_config({"preset": "fc9"})
    with pytest.raises(ConfigError, match="'curvature_estimator' must be one of"):
        make_config({"curvature_estimator": "sketch"})
    with pytest.raises(ConfigError, match="'num_probes' must be >= 1, got 0"):
        make_config({"num_probes": 0})
    with pytest.raises(ConfigError, match=r"'milestones\[1\]' must be int, got str"):
        make_config({"milestones": [3, "5"]})
    with pytest.raises(ConfigError, match="'milestones' must be a list"):
        make_config({"milestones": 3})
    with pytest.raises(ConfigError, match="'epochs' must be int, got bool"):
        make_config({"epochs": True})
    with pytest.raises(ConfigError, match="'augment' must be bool, got int"):
        make_config({"augment": 1})
    with pytest.raises(ConfigError, match="'seed' may not be null"):
        make_config({"seed": None})
    with pytest.raises(ConfigError, match="'train_subset' must be >= 1"):
        make_config({"train_subset": 0})
    cfg = make_config({"lr": 1, "train_subset": None, "milestones": (2, 4)})
    assert type(cfg.lr) is float and cfg.train_subset is None and cfg.milestones == [2, 4]


def test_choice_lists_come_from_the_code_that_implements_them():
    import curvreg
    from curvreg.lab import config, data, loader, models
    types = config.field_types()
    assert config.choices(types["curvature_estimator"]) == curvreg.probe.ESTIMATORS
    assert config.choices(types["probe_distribution"]) == curvreg.probe.DISTRIBUTIONS
    assert config.choices(types["batch_norm"]) == curvreg.batchnorm.MODES
    assert config.choices(types["normalization"]) == loader.NORMALIZATIONS
    assert config.choices(types["model"]) == tuple(models.MODELS)
    assert config.choices(types["activation"]) == tuple(models.ACTIVATIONS)
    assert config.choices(types["dataset"]) == tuple(data.SPECS)
    assert config.choices(types["preset"]) == tuple(config.PRESETS)
    for name in config.ACTIVATIONS:
        models.build_model("fc512", activation=name)  # every listed choice is implemented
    for f in dataclasses.fields(config.TrainConfig):
        assert f.metadata["help"], f.name


def test_cli_errors_and_help(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--alpha" in capsys.readouterr().out
    assert main(["train", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "'preset' must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "many"])
    assert e.value.code == 2
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: fc512-cifar10\nmomentun: 0.5\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "y")]) == 2
    assert "momentun" in capsys.readouterr().err


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_resolve(preset):
    cfg = make_config({"preset": preset})
    assert preset == f"{cfg.model}-{cfg.dataset}" and cfg.model in MODELS


def test_resnet20_trains_with_the_penalty_through_batch_norm(tmp_path):
    """Training-mode BatchNorm, unbiased penalty, from the CLI."""
    out = tmp_path / "r"
    assert main(["train", "--preset", "resnet20-cifar10", "--width", "0.5", "--train-subset", "256",
                 "--val-size", "100", "--batch-size", "64", "--epochs", "2", "--lr", "0.05",
                 "--schedule", "constant", "--alpha", "0.001", "--batch-norm", "unbiased",
                 "--data-dir", DATA, "--no-progress", "--no-augment", "--out", str(out)]) == 0
    m = metrics(out)
    assert m[-1]["train_loss"] < m[0]["train_loss"]
    assert all(x["train_sq_grad_norm"] > 0 and x["fisher_trace"] > 0 for x in m)
    assert json.loads((out / "config.json").read_text())["batch_norm"] == "unbiased"


@pytest.mark.slow
def test_ddp_two_ranks_match_single_process(tmp_path):
    # 250 examples in batches of 63: every step splits unevenly (31/32, last 30/31), and each
    # rank's mean is weighted by its share, so the update is still the global batch's.
    args = ["train", "--preset", "fc512-cifar10", "--train-subset", "250", "--val-size", "100",
            "--batch-size", "63", "--epochs", "1", "--data-dir", DATA, "--alpha", "0.01", "--no-progress"]
    env = {**os.environ, "CURVREG_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "curvreg", *args, "--out", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", "29533", "-m", "curvreg", *args, "--out", str(tmp_path / "two")],
                   check=True, env=env, capture_output=True)
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["model"]
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-6 * a[k].norm(), k


def test_every_config_field_has_a_flag_and_typos_get_a_suggestion(capsys):
    import dataclasses
    from curvreg.lab.cli import build_parser
    from curvreg.lab.config import TrainConfig
    args = build_parser().parse_args(["train", "--milestones", "3", "5", "--activation", "gelu",
                                      "--no-augment", "--train-subset", "7", "--gnp-beta", "0.5"])
    assert (args.milestones, args.activation, args.augment, args.train_subset, args.gnp_beta) == \
        ([3, 5], "gelu", False, 7, 0.5)
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in help_text, f.name
    with pytest.raises(SystemExit) as e:
        main(["train", "--epoch", "3"])  # no abbreviation: --epoch is not --epochs
    assert e.value.code == 2 and "--epoch -> --epochs?" in capsys.readouterr().err


def test_derived_seeds_never_collide():
    """Shuffle seeds (per epoch) and probe seeds (per rank) are distinct streams; the former
    affine formulas made epoch 17's shuffle seed equal to rank 0's probe seed."""
    seeds = [train_mod.derived_seed(s, stream, k) for s in range(10)
             for stream in train_mod.STREAMS for k in range(300)]
    assert len(set(seeds)) == len(seeds) and all(0 <= x < 2 ** 63 for x in seeds)
    assert train_mod.derived_seed(0, "shuffle", 17) != train_mod.derived_seed(0, "probes", 0)


def test_bf16_on_cpu_trains_with_the_penalty(tmp_path):
    """--bf16 is honoured on the CPU (autocast), not silently ignored."""
    calls = []
    real = torch.autocast

    def spy(device_type, dtype=None, enabled=True, **kw):
        calls.append((device_type, dtype, enabled))
        return real(device_type, dtype=dtype, enabled=enabled, **kw)

    import unittest.mock
    with unittest.mock.patch.object(train_mod.torch, "autocast", spy):
        s = train_mod.train({**QUICK, "epochs": 1, "bf16": True, "device": "cpu"}, tmp_path / "r",
                            progress=False)
    assert s["status"] == "done" and ("cpu", torch.bfloat16, True) in calls
    assert metrics(tmp_path / "r")[0]["train_sq_grad_norm"] > 0


def test_json_config_file_and_no_validation_split(tmp_path, capsys):
    """A JSON --config takes the same fields as flags (flags override it). With val_size 0 the
    validation metrics are None, not a made-up 0, and selection has nothing to choose from."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({**QUICK, "epochs": 1, "alpha": 0.0, "val_size": 0, "lr": 0.5}))
    assert main(["train", "--config", str(cfg), "--lr", "0.05", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["lr"] == 0.05 and saved["val_size"] == 0 and saved["epochs"] == 1
    m = metrics(tmp_path / "r")[0]
    assert m["val_acc"] is None and m["val_loss"] is None and m["test_acc"] > 0.1
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["best_val_acc"] is None and s["test_acc"] == m["test_acc"]
    assert "val_acc -" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["train", "--config", str(bad)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_bad_data_leaves_no_run_directory(tmp_path, capsys):
    empty = tmp_path / "nodata"
    empty.mkdir()
    assert main(["train", "--out", str(tmp_path / "r"), "--data-dir", str(empty)]) == 2
    assert "cifar10" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_cuda_without_a_gpu_is_a_bad_argument(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["train", "--device", "cuda", "--out", str(tmp_path / "r"), "--data-dir", DATA]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_resume_with_more_epochs(tmp_path, capsys):
    """Extending a constant-schedule run updates config.json; a cosine run is refused (its
    learning rate would jump)."""
    const = {**QUICK, "epochs": 1, "schedule": "constant", "alpha": 0.0}
    train_mod.train(const, tmp_path / "c", progress=False, tensorboard=True)
    assert main(["train", "--resume", str(tmp_path / "c"), "--epochs", "2", "--no-progress",
                 "--tensorboard"]) == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["epochs"] == 2
    m = metrics(tmp_path / "c")
    assert len(m) == 2
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["resumes"] == [{"from_epoch": 1, "epochs": 2}]
    # TensorBoard scalars beside metrics.jsonl, one per epoch across the resume
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "c" / "tensorboard"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("val_acc")]
    assert got == [(x["epoch"], pytest.approx(x["val_acc"])) for x in m]
    assert {"train_loss", "fisher_trace", "lr", "test_acc"} <= set(events.Tags()["scalars"])
    # only --epochs may change on resume
    assert main(["train", "--resume", str(tmp_path / "c"), "--lr", "0.5"]) == 2
    assert "only --epochs may change (got ['lr'])" in capsys.readouterr().err
    train_mod.train({**const, "schedule": "cosine"}, tmp_path / "k", progress=False)
    assert main(["train", "--resume", str(tmp_path / "k"), "--epochs", "2"]) == 2
    assert "cosine" in capsys.readouterr().err
    assert json.loads((tmp_path / "k" / "config.json").read_text())["epochs"] == 1


@pytest.mark.parametrize("method,estimator", [("sgd", "exact"), ("sgd", "hybrid"), ("sam", "exact")])
def test_a_step_reads_nothing_back_to_the_host(tmp_path, monkeypatch, method, estimator):
    """No .item(), bool() or float() of a tensor inside a step (each is a device sync on a
    GPU); run_epoch reads its sums every CHECK_EVERY steps. The first step may check the
    recorded structure once (the tape's independence check)."""
    cfg = make_config({**QUICK, "method": method, "curvature_estimator": estimator, "epochs": 1})
    trainer = train_mod.Trainer(cfg, tmp_path, progress=False)
    x, y = trainer.data.x_train[:64], trainer.data.y_train[:64]
    trainer.step(x, y, 0.0)
    reads = []
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _r=real: (reads.append(_n), _r(self, *a))[1])
    trainer.step(x, y, 0.1)
    monkeypatch.undo()
    assert reads == []


@pytest.mark.parametrize("m", [3, 24])
def test_group_size_that_does_not_divide_the_last_batch(tmp_path, monkeypatch, m):
    """448 training examples in batches of 48: the last batch (16) is cut to whole groups of m,
    or left out when it holds none, instead of failing in the tape."""
    sizes = []
    real = train_mod.Trainer.step

    def spy(self, x, y, t):
        sizes.append(x.shape[0])
        return real(self, x, y, t)

    monkeypatch.setattr(train_mod.Trainer, "step", spy)
    train_mod.train({**QUICK, "train_subset": 448, "batch_size": 48, "epochs": 1, "alpha": 1e-3,
                     "group_size": m}, tmp_path / "r", progress=False)
    assert sizes == [48] * 9 + ([15] if m == 3 else [])
