"""``curvreg sharpness`` on a saved run: files, consistency with the library, errors."""
import json
import os
from pathlib import Path

import pytest

from curvreg.lab import train as train_mod
from curvreg.lab.cli import main
from curvreg.lab.sharpness import ce, load_run
from curvreg.reference import loop_sq_grad_norms

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("CURVREG_DATA", str(ROOT.parent / "shared" / "data"))
pytestmark = pytest.mark.skipif(not Path(DATA, "cifar10.npz").is_file(), reason="no CIFAR-10 copy")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharp") / "run"
    train_mod.train(dict(preset="fc512-cifar10", train_subset=256, val_size=200, batch_size=64,
                         epochs=1, data_dir=DATA, fisher_eval_size=64), out, progress=False)
    return out


def test_cli_writes_sharpness_json(run, capsys):
    args = ["sharpness", str(run), "--subset", "48", "--batch-size", "32", "--probes", "6",
            "--fisher-labels", "sample", "--fisher-samples", "3", "--eigs", "2", "--device", "cpu",
            "--eig-iters", "3", "--eig-tol", "1e-12", "--progress"]
    assert main(args) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "sharpness: top 2 Hessian eigenvalues (Lanczos, tol 1e-12, at most 3" in captured.err
    res = json.loads((run / "sharpness.json").read_text())
    assert res["eigen_iterations"] == 3 and res["eigen_converged"] is False
    assert "tr(F_bar)/tr(H)" in printed and "sharpness.json" in printed
    res = json.loads((run / "sharpness.json").read_text())
    assert res["num_examples"] == 48 and res["mode"] == "eval" and res["epoch"] == 1
    assert res["hessian_trace"]["num_probes"] == 6 and res["hessian_trace"]["stderr"] > 0
    assert len(res["top_eigenvalues"]) == 2 and res["top_eigenvalues"][0] >= res["top_eigenvalues"][1]
    r = res["ratios"]["empirical_fisher/hessian"]
    assert r["value"] == pytest.approx(res["empirical_fisher_trace"] / res["hessian_trace"]["value"])
    # tr(F_bar) is the exact mean squared per-example gradient norm of the saved model.
    _, model, data, _ = load_run(run, "cpu", DATA)
    sq = loop_sq_grad_norms(model, ce, data.x_train[:48], data.y_train[:48])
    assert res["empirical_fisher_trace"] == pytest.approx(sq.mean().item(), rel=1e-4)
    # Same seed, same numbers (checkpoint path form, explicit --out).
    assert main(args[:1] + [str(run / "checkpoint.pt")] + args[2:] + ["--out", str(run / "again.json")]) == 0
    again = json.loads((run / "again.json").read_text())
    assert again["hessian_trace"] == res["hessian_trace"] and again["fisher_trace"] == res["fisher_trace"]
    # Default for 10 classes: the exact label sum; a ReLU net has tr(H) = tr(F) exactly, so the
    # Hutchinson estimate must cover it.
    assert main(args[:6] + ["--probes", "60", "--eigs", "1", "--out", str(run / "exact.json")]) == 0
    ex = json.loads((run / "exact.json").read_text())
    assert ex["fisher_trace"]["labels"] == "all" and ex["fisher_trace"]["num_classes"] == 10
    h = ex["hessian_trace"]
    assert abs(h["value"] - ex["fisher_trace"]["value"]) < 4 * h["stderr"]


def test_cli_errors(run, tmp_path, capsys):
    assert main(["sharpness", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["sharpness", str(run), "--probes", "1"]) == 2
    assert "--probes must be >= 2" in capsys.readouterr().err


def test_batch_statistics_option_on_a_resnet(tmp_path, capsys):
    """--batch-norm unbiased: BatchNorm with each batch's statistics, tr(F_bar) with an error bar
    that covers the true value (autograd on each loss entry, per batch)."""
    import torch
    out = tmp_path / "resnet"
    train_mod.train(dict(preset="resnet20-cifar10", width=0.25, train_subset=128, val_size=100,
                         batch_size=64, epochs=1, alpha=0.0, augment=False, data_dir=DATA,
                         fisher_eval_size=64), out, progress=False)
    args = ["sharpness", str(out), "--subset", "48", "--batch-size", "24", "--probes", "4",
            "--fisher-samples", "3", "--eigs", "1", "--device", "cpu", "--batch-norm", "unbiased"]
    assert main(args) == 0
    assert "unbiased estimate" in capsys.readouterr().out
    res = json.loads((out / "sharpness.json").read_text())
    assert res["batch_norm"] == "unbiased" and res["fisher_trace"]["labels"] == "sample"
    _, model, data, _ = load_run(out, "cpu", DATA)
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train()
    params = [p for p in model.parameters() if p.requires_grad]
    true = []
    for i in (0, 24):
        losses = ce(model(data.x_train[i:i + 24]), data.y_train[i:i + 24])
        true += [sum(g.pow(2).sum() for g in torch.autograd.grad(losses[k], params, retain_graph=True))
                 for k in range(24)]
    value, se = res["empirical_fisher_trace"], res["empirical_fisher_trace_stderr"]
    assert se > 0 and abs(value - torch.stack(true).mean().item()) < 4.5 * se
    assert main(args + ["--fisher-labels", "all"]) == 2
