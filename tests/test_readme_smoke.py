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
