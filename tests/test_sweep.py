"""Sweeps: spec checks, resume, retries, real SIGKILLs of a worker and of the driver, Ray, report."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from curvreg.lab import report, sweep
from curvreg.lab.exitcodes import Exit
from curvreg.lab.io import read_run
from curvreg.lab.runid import config_hash
from curvreg.lab.cli import main
from curvreg.lab.config import ConfigError
from curvreg.lab.sweep.store import Store, StoreError, StoreLocked, driver_lock

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("CURVREG_DATA", str(ROOT.parent / "shared" / "data"))
needs_data = pytest.mark.skipif(not Path(DATA, "cifar10.npz").is_file(), reason="no CIFAR-10 copy")
BASE = ("base: {preset: fc512-cifar10, epochs: %d, train_subset: %d, val_size: 200, batch_size: 64, "
        "fisher_eval_size: 64, schedule: constant}\n")
TIMING = {"epoch_seconds", "examples_per_second"}


def spec(tmp_path, grid, epochs=1, subset=256, extra="", name="s.yaml"):
    path = tmp_path / name
    path.write_text(BASE % (epochs, subset) + f"grid: {grid}\n" + extra)
    return path


def runs_by_hash(db):
    store = Store(db)
    return {r["hash"]: r for r in store.runs()}, store


def curves(store, h):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in store.metrics(h)]


def start_driver(spec_path, db):
    """The sweep CLI in its own process (so that the test can SIGKILL it or its workers)."""
    return subprocess.Popen([sys.executable, "-m", "curvreg", "sweep", str(spec_path), "--db", str(db),
                             "--threads", "1", "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def rows_where(db, status):
    """Rows of ``status`` with a worker pid, or [] before the store exists."""
    if not db.exists():
        return []
    return [r for r in Store(db).runs() if r["status"] == status and (status != "running" or r["pid"])]


def wait_for(cond, timeout=120, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------- spec
def test_spec_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: {preset: fc512-cifar10}\ngird: {lr: [0.1]}\n")
    with pytest.raises(ConfigError, match=r"unknown spec key\(s\) \['gird'\]"):
        sweep.load_spec(bad)
    bad.write_text("grid: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match="grid field 'lr' must be a non-empty list"):
        sweep.load_spec(bad)
    bad.write_text("base: {preset: fc512-cifar10}\ngrid: {}\n")
    with pytest.raises(ConfigError, match="no points: 'grid' is empty"):
        sweep.load_spec(bad)
    bad.write_text("grid: {lrr: [0.1]}\n")
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['lrr'\]"):
        sweep.expand(sweep.load_spec(bad))
    bad.write_text("grid: {lr: [0.1, fast]}\n")
    with pytest.raises(ConfigError, match=r"grid point \{'lr': 'fast'\}: field 'lr' must be float"):
        sweep.expand(sweep.load_spec(bad))
    assert main(["sweep", str(bad), "--db", str(tmp_path / "x.db")]) == 2


def test_expand_product_extras_and_hash():
    s = {"base": {"preset": "fc512-cifar10", "epochs": 1}, "grid": {"lr": [0.1, 0.2], "alpha": [0.0, 1.0]},
         "extra": [{"lr": 0.1, "alpha": 0.0}, {"lr": 0.5}], "max_attempts": 3}
    assert len(sweep.expand({**s, "grid": {}})) == 2  # extras only, not the bare base
    points = sweep.expand(s)
    assert len(points) == 5  # 4 grid points + 1 new extra (the other duplicates a grid point)
    assert {(p["lr"], p["alpha"]) for p in points} == {(0.1, 0.0), (0.1, 1.0), (0.2, 0.0), (0.2, 1.0), (0.5, 5e-4)}
    a = config_hash({**points[0], "data_dir": "/a"})
    assert a == config_hash({**points[0], "data_dir": "/b"}) != config_hash(points[1])
    # a field added later is left out of the hash at its default, and counts otherwise
    old = {k: v for k, v in points[0].items() if k != "probe_distribution"}
    assert config_hash(old) == config_hash(points[0])
    assert config_hash({**points[0], "probe_distribution": "kronecker"}) != config_hash(old)


def test_committed_stores_keep_their_hashes():
    # New config fields must not orphan committed results: every point of the committed Figure 1
    # spec is found in its committed store under the hash the code computes today.
    import sqlite3
    root = Path(__file__).resolve().parents[1] / "sweeps"
    points = sweep.expand(sweep.load_spec(root / "fc512-fig1.yaml"))
    with sqlite3.connect(f"file:{root / 'fc512-fig1' / 'sweep.db'}?immutable=1", uri=True) as db:
        stored = {h for (h,) in db.execute("select hash from runs where status = 'done'")}
    assert len(points) == 64 and {config_hash(p) for p in points} <= stored


def test_store_rejects_garbage(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_text("not a database " * 100)
    with pytest.raises(StoreError, match="not a usable sweep database"):
        Store(junk).runs()


HOLD = ("import sys, time\nfrom curvreg.lab.sweep.store import driver_lock\n"
        "with driver_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n")


@needs_data
def test_one_driver_per_store_and_a_killed_one_never_blocks(tmp_path, capsys):
    s = spec(tmp_path, "{lr: [0.01]}")
    db = tmp_path / "s" / "sweep.db"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(db)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(StoreLocked, match=f"pid {holder.pid} on "):
            with driver_lock(db):
                pass
        assert main(["sweep", str(s), "--db", str(db)]) == Exit.LOCKED == 4
        assert "is driving" in capsys.readouterr().err
        assert not db.exists()  # refused before the store was touched
    finally:
        holder.kill()
        holder.wait()
    with driver_lock(db):  # the kernel dropped the dead holder's lock
        pass


# ----------------------------------------------------------------------- local runs
@needs_data
def test_sweep_resumes_skips_done_and_adds_new_points(tmp_path, capsys):
    db = tmp_path / "sw" / "sweep.db"
    s = spec(tmp_path, "{lr: [0.05], alpha: [0.0, 0.01]}")
    assert main(["sweep", str(s), "--db", str(db), "--workers", "2", "--threads", "1"]) == 0
    first, store = runs_by_hash(db)
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in first.values()) and len(first) == 2
    assert all(store.metrics(h) and r["summary"]["test_acc"] > 0 for h, r in first.items())
    s.write_text(s.read_text().replace("alpha: [0.0, 0.01]", "alpha: [0.0, 0.01, 0.02]"))
    assert main(["sweep", str(s), "--db", str(db), "--workers", "2", "--threads", "1"]) == 0
    second, _ = runs_by_hash(db)
    assert len(second) == 3
    for h, r in first.items():  # untouched: not re-run
        assert second[h]["finished"] == r["finished"] and second[h]["attempts"] == 1
    assert "1 new" in capsys.readouterr().out


@needs_data
def test_failed_runs_are_retried_up_to_the_limit(tmp_path, capsys):
    s = spec(tmp_path, "{lr: [0.05]}", extra="max_attempts: 2\n")
    s.write_text(s.read_text().replace("schedule: constant", "schedule: constant, val_size: 60000"))
    db = tmp_path / "f.db"
    assert main(["sweep", str(s), "--db", str(db), "--threads", "1", "--no-progress"]) == 1
    r, = runs_by_hash(db)[0].values()
    assert r["status"] == "failed" and r["attempts"] == 2
    last = r["error"].strip().splitlines()[-1]
    assert last in capsys.readouterr().out  # each failure line says why
    assert main(["report", str(db)]) == 2  # no finished run: an error, not an empty table
    assert "no finished run" in capsys.readouterr().err
    # Its attempts are used up: a plain rerun leaves it alone; --retry-failed gives it new ones.
    assert main(["sweep", str(s), "--db", str(db), "--threads", "1", "--no-progress"]) == 1
    again, = runs_by_hash(db)[0].values()
    assert again["attempts"] == 2 and again["started"] == r["started"]
    capsys.readouterr()
    assert main(["sweep", str(s), "--db", str(db), "--threads", "1", "--no-progress",
                 "--retry-failed"]) == 1
    retried, = runs_by_hash(db)[0].values()
    assert retried["attempts"] == 2 and retried["started"] > r["started"]
    assert "1 failed retried" in capsys.readouterr().out


def test_a_systematic_failure_stops_the_sweep_early(tmp_path, capsys):
    # Every point fails the same way: the driver stops after STOP_AFTER identical failures
    # instead of spending max_attempts on every point; the rest stay pending for a rerun.
    s = spec(tmp_path, "{lr: [0.01, 0.05, 0.1]}", extra="max_attempts: 3\n")
    s.write_text(s.read_text().replace("schedule: constant", "schedule: constant, val_size: 60000"))
    db = tmp_path / "f.db"
    assert main(["sweep", str(s), "--db", str(db), "--threads", "1", "--no-progress"]) == 1
    runs = runs_by_hash(db)[0].values()
    assert sum(r["attempts"] for r in runs) == 3
    assert sorted(r["status"] for r in runs) == ["failed", "pending", "pending"]
    assert "stopping: the last 3 attempts failed with the same error (ValueError: val_size" in \
        capsys.readouterr().out


def test_missing_data_is_one_clear_error_before_any_run(tmp_path, capsys):
    s = spec(tmp_path, "{lr: [0.05, 0.1]}")
    s.write_text(s.read_text().replace("schedule: constant", "schedule: constant, data_dir: /nonexistent"))
    db = tmp_path / "m.db"
    assert main(["sweep", str(s), "--db", str(db), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "/nonexistent" in err and not db.exists()
    assert main(["report", str(tmp_path / "nothing")]) == 2


@needs_data
@pytest.mark.slow
def test_sigkill_of_a_worker_resumes_the_run_exactly(tmp_path):
    s = spec(tmp_path, "{lr: [0.05], alpha: [0.01]}", epochs=3, subset=512)
    db = tmp_path / "k" / "sweep.db"
    driver = start_driver(s, db)
    try:
        def running_with_one_epoch():
            rows = rows_where(db, "running")
            if rows and (db.parent / "runs" / rows[0]["hash"] / "metrics.jsonl").is_file():
                return rows[0]
        row = wait_for(running_with_one_epoch, what="a run with a finished epoch")
        os.kill(row["pid"], signal.SIGKILL)
        assert driver.wait(timeout=300) == 0, driver.stdout.read().decode()
    finally:
        driver.kill()
    runs, store = runs_by_hash(db)
    r = runs[row["hash"]]
    assert r["status"] == "done" and r["attempts"] == 2
    # The resumed run equals an uninterrupted one, epoch by epoch.
    ref_dir = tmp_path / "ref"
    torch_threads = torch.get_num_threads()
    try:
        sweep.execute(r["config"], ref_dir, threads=1)
    finally:
        torch.set_num_threads(torch_threads)
    _, ref = read_run(ref_dir)
    assert curves(store, row["hash"]) == [{k: v for k, v in m.items() if k not in TIMING} for m in ref]


@needs_data
@pytest.mark.slow
def test_sigkill_of_the_whole_sweep_loses_nothing(tmp_path):
    s = spec(tmp_path, "{lr: [0.02, 0.05, 0.1]}", epochs=2, subset=512)
    db = tmp_path / "w" / "sweep.db"
    driver = start_driver(s, db)
    try:
        def one_done_one_running():
            done, running = rows_where(db, "done"), rows_where(db, "running")
            return (done, running) if done and running else None
        done, running = wait_for(one_done_one_running, what="one run done and one running")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    child = running[0]["pid"]
    wait_for(lambda: not Path(f"/proc/{child}").exists() or
             Path(f"/proc/{child}/stat").read_text().split()[2] == "Z", 30, "the orphaned worker to die")
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    assert main(["sweep", str(s), "--db", str(db), "--threads", "1"]) == 0
    after, _ = runs_by_hash(db)
    assert all(r["status"] == "done" for r in after.values()) and len(after) == 3
    for r in done:
        assert after[r["hash"]]["finished"] == r["finished"] and after[r["hash"]]["attempts"] == 1
    assert after[running[0]["hash"]]["attempts"] == 2
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT hash || '/' || epoch) FROM metrics").fetchone() == (6, 6)
    con.close()


@needs_data
@pytest.mark.slow
def test_ray_backend_matches_local(tmp_path, capsys):
    ray = pytest.importorskip("ray")
    s = spec(tmp_path, "{lr: [0.02, 0.05], weight_decay: [0.0, 0.0005], alpha: [0.0, 0.01]}", subset=128)
    assert main(["sweep", str(s), "--db", str(tmp_path / "l.db"), "--workers", "2", "--threads", "1"]) == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"CURVREG_DATA": DATA}})
    # a point that fails inside the task (val_size larger than the training set): retried up
    # to max_attempts, then failed with the task's error in the store; the other point is done
    bad = spec(tmp_path, "{lr: [0.02]}", subset=128, name="f.yaml",
               extra="extra: [{val_size: 50000}]\nmax_attempts: 2\n")
    try:
        assert main(["sweep", str(s), "--db", str(tmp_path / "r.db"), "--workers", "2",
                     "--threads", "1", "--backend", "ray"]) == 0
        assert main(["sweep", str(bad), "--db", str(tmp_path / "f.db"), "--workers", "2",
                     "--threads", "1", "--backend", "ray"]) == Exit.FAILED
    finally:
        ray.shutdown()
    failed, _ = runs_by_hash(tmp_path / "f.db")
    by_status = {r["status"]: r for r in failed.values()}
    assert sorted(by_status) == ["done", "failed"] and by_status["failed"]["attempts"] == 2
    assert "val_size must be in [0, 50000)" in by_status["failed"]["error"]
    printed = capsys.readouterr().out
    assert "val_size must be in" in printed  # the failure line says why
    assert printed.count("runner overhead:") == 3
    local, ls = runs_by_hash(tmp_path / "l.db")
    remote, rs = runs_by_hash(tmp_path / "r.db")
    assert local.keys() == remote.keys() and len(local) == 8
    for h in local:
        assert remote[h]["status"] == "done"
        assert curves(rs, h) == curves(ls, h)


# ----------------------------------------------------------------------- report
def fake_store(path):
    """Runs with known accuracies: two seeds per setting, four columns, one diverged run."""
    store = Store(path)
    rows = []
    acc = {(0.0, 0.0): 0.60, (5e-4, 0.0): 0.65, (0.0, 0.1): 0.63, (5e-4, 0.1): 0.70}
    for lr in (0.01, 0.1):
        for (wd, alpha), base in acc.items():
            for seed in (0, 1):
                cfg = {"model": "fc512", "dataset": "cifar10", "method": "sgd", "lr": lr,
                       "weight_decay": wd, "alpha": alpha, "seed": seed, "epochs": 2}
                bump = 0.02 if lr == 0.1 else 0.0  # lr 0.1 is better on validation
                summary = {"val_acc": base + bump + 0.01 * seed, "test_acc": base + bump - 0.01 * seed,
                           "train_acc": 1.0, "fisher_trace": 1.0}
                rows.append((config_hash(cfg), cfg, summary))
    diverged = {"model": "fc512", "dataset": "cifar10", "method": "sgd", "lr": 1.0,
                "weight_decay": 0.0, "alpha": 0.0, "seed": 0, "epochs": 2}
    missing = dict(diverged, lr=2.0)
    store.add([(h, c, "x") for h, c, _ in rows] + [(config_hash(diverged), diverged, "x"),
                                                   (config_hash(missing), missing, "x")])
    for h, c, s in rows:
        store.claim([h], 1)
        store.finish(h, "done", s, [{"epoch": e, "val_acc": 0.5, "test_acc": 0.5, "fisher_trace": 2.0 / e}
                                    for e in (1, 2)])
    store.claim([config_hash(diverged)], 1)
    store.finish(config_hash(diverged), "diverged", {"status": "diverged", "val_acc": None}, [])
    store.close()


def test_report_selects_by_validation_and_writes_everything(tmp_path, capsys):
    fake_store(tmp_path / "sweep.db")
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    out = tmp_path / "rep"
    table = (out / "table.md").read_text()
    # lr 0.1 chosen in every column; test = base + 0.02 - 0.01*seed -> mean base + 0.015, std 0.00707
    assert "| fc512 / cifar10 (ours, 2 epochs) | 61.50 ± 0.71 (n=2) | 66.50 ± 0.71 (n=2) | 64.50 ± 0.71 (n=2) | 71.50 ± 0.71 (n=2) |" in table
    assert "| fc512 / cifar10 (paper) | 64.97 | 70.16 | 69.98 | 71.65 |" in table
    assert "highest mean final validation accuracy" in table
    for f in ("index.md", "runs.csv", "fig1_fc512_cifar10.png", "fig2_fc512_cifar10.png",
              "curves_fc512_cifar10.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert len((out / "runs.csv").read_text().splitlines()) == 1 + 18
    index = (out / "index.md").read_text()
    assert "diverged 1" in index and "pending 1" in index
    assert json.loads((out / "selected.json").read_text())[0]["lr"] == 0.1
    grid = report.grid_accuracy(Store(tmp_path / "sweep.db").runs(), "fc512", "cifar10")
    assert grid[0.0][(1.0, 0.0)] != grid[0.0][(1.0, 0.0)]  # diverged cell is NaN
    assert main(["report", str(tmp_path / "nothing")]) == 2
    # Selecting by seed 1 alone: lr 0.1 still wins (its seed-1 val is higher too); same cells.
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r1"), "--select-seed", "1"]) == 0
    assert "seed-1 run" in (tmp_path / "r1" / "table.md").read_text()


def test_select_seed_changes_the_choice(tmp_path):
    """Setting A wins on the mean over seeds, B on seed 0 alone."""
    store = Store(tmp_path / "sweep.db")
    vals = {0.01: {0: 0.60, 1: 0.70}, 0.02: {0: 0.65, 1: 0.60}}
    for lr, by_seed in vals.items():
        for seed, val in by_seed.items():
            cfg = {"model": "fc512", "dataset": "cifar10", "method": "sgd", "lr": lr,
                   "weight_decay": 0.0, "alpha": 0.0, "seed": seed, "epochs": 1}
            h = config_hash(cfg)
            store.add([(h, cfg, "x")])
            store.claim([h], 1)
            store.finish(h, "done", {"val_acc": val, "test_acc": val - 0.1}, [])
    runs = store.runs()
    store.close()
    assert report.select(runs)[("fc512", "cifar10")]["no reg"]["config"]["lr"] == 0.01
    assert report.select(runs, select_seed=0)[("fc512", "cifar10")]["no reg"]["config"]["lr"] == 0.02



def test_seeds_added_after_a_new_config_field_join_their_setting(tmp_path):
    # Seed 0 was stored before `probe_distribution` existed; seed 1 carries it at its default.
    # Both hash as before (HASHED_UNLESS_DEFAULT) and must count as one setting (n = 2).
    store = Store(tmp_path / "sweep.db")
    base = {"model": "fc512", "dataset": "cifar10", "method": "sgd", "lr": 0.05,
            "weight_decay": 1e-3, "alpha": 0.0, "epochs": 1}
    for cfg, acc in ((dict(base, seed=0), 0.70), (dict(base, seed=1, probe_distribution="rademacher"), 0.72)):
        h = config_hash(cfg)
        store.add([(h, cfg, "x")])
        store.claim([h], 1)
        store.finish(h, "done", {"val_acc": acc, "test_acc": acc}, [])
    runs = store.runs()
    store.close()
    sel = report.select(runs, select_seed=0)[("fc512", "cifar10")]["L2 only"]
    assert sorted(sel["test"]) == [0.70, 0.72]
    assert config_hash(dict(base, seed=1)) == config_hash(dict(base, seed=1, probe_distribution="rademacher"))

def test_estimator_evidence_regenerates_the_committed_table(tmp_path):
    # README's probe-evidence table is script output over the committed store.
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "scripts" / "estimator_evidence.py"),
                          "--db", str(root / "sweeps" / "allcnn-estimators" / "sweep.db"),
                          "--out", str(tmp_path)], capture_output=True, text=True, check=True)
    assert "exact penalty" in out.stdout and (tmp_path / "curves.png").stat().st_size > 0
    assert (tmp_path / "table.md").read_text() == (root / "docs" / "probe-evidence" / "table.md").read_text()


COMMITTED_REPORTS = [  # (store, committed report dir, extra args): REPRODUCTION.md's tables
    ("sweeps/fc512-fig1", "docs/repro/fig1", []),
    ("sweeps/fc512-fig1/table1.db", "docs/repro/table1", ["--select-seed", "0"]),
    ("sweeps/fc512-zca100", "docs/repro/table1-zca100", ["--select-seed", "0"]),
]


@pytest.mark.parametrize("store,committed,args", COMMITTED_REPORTS)
def test_report_regenerates_the_committed_tables(tmp_path, store, committed, args):
    # Every number in REPRODUCTION.md's tables traces to a committed store: rerunning the
    # report on it gives the committed table and selection, byte for byte.
    root = Path(__file__).resolve().parents[1]
    main(["report", str(root / store), "--out", str(tmp_path), *args])
    for name in ("table.md", "selected.json"):
        assert (tmp_path / name).read_text() == (root / committed / name).read_text(), (
            f"{committed}/{name} is stale; regenerate it with "
            f"`curvreg report {store} --out {committed} {' '.join(args)}` and commit both")


def test_reach_curve_is_the_exact_step_function():
    # Figure 2: % of configurations whose accuracy reaches each threshold (>=, so a value equal
    # to the threshold counts); a diverged run (NaN) counts in the total but never reaches one.
    xs, ys = report.reach_curve([50.0, 60.0, 60.0, float("nan")], 40.0, 70.0)
    assert xs == [40.0, 50.0, 60.0, 70.0] and ys == [75.0, 50.0, 0.0, 0.0]
    at = lambda t: next(y for x, y in zip(reversed(xs), reversed(ys)) if x < t) if t > xs[0] else ys[0]  # noqa: E731
    for t in (45.0, 50.0, 55.0, 60.0, 65.0):  # steps-post: ys[k] holds on (xs[k], xs[k + 1]]
        assert at(t) == 100 * sum(v >= t for v in (50.0, 60.0, 60.0)) / 4, t
