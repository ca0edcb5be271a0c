"""End-to-end smoke test of the README's main command on a small subset, for one epoch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("CURVREG_DATA", str(ROOT.parent / "shared" / "data"))


@pytest.mark.skipif(not Path(DATA, "cifar10.npz").is_file(), reason="no CIFAR-10 copy")
@pytest.mark.slow
def test_readme_main_command(tmp_path):
    env = {**os.environ, "VENV": str(Path(sys.executable).parents[1]), "CURVREG_DATA": DATA}
    out = tmp_path / "run"
    res = subprocess.run(["bash", "scripts/train.sh", "--epochs", "1", "--train-subset", "1000",
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"results in {out}" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done" and summary["config"]["alpha"] > 0


def test_quickstart_example_runs(capsys):
    import runpy
    ns = runpy.run_path(str(ROOT / "examples" / "quickstart.py"))
    ns["main"](steps=1)
    assert "step 0: loss" in capsys.readouterr().out


def test_custom_model_example_is_exact_and_shows_the_refusal(capsys):
    import runpy
    errors = runpy.run_path(str(ROOT / "examples" / "custom_model.py"))["main"]()
    out = capsys.readouterr().out
    assert errors["Net"] < 1e-10 and errors["Tied"] < 1e-10
    assert "<root> fallback" in out and "refused: module '1' (BatchNorm1d)" in out


def test_diagnostics_example_agrees_with_the_exact_hessian():
    import runpy

    import torch
    from models import dense_hessian
    ns = runpy.run_path(str(ROOT / "examples" / "diagnostics.py"))
    model, batches, (h, fbar, f, eig) = ns["main"](steps=50)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    hess = dense_hessian(model, x, y)
    assert abs(h.value - hess.trace().item()) < 4 * h.stderr
    top = torch.linalg.eigvalsh(hess).flip(0)[:3]
    assert eig.converged and torch.allclose(torch.tensor(eig.eigenvalues, dtype=torch.float64), top, rtol=1e-4)
