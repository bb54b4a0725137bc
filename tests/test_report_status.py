"""One status per trial in every view: a run still marked running whose driver is gone is
`interrupted` in `sweeper status`, `frontier` and `report` alike (and `running` in all three while
the driver lives). A real finished sweep, copied, one of its runs set back to running."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pandas as pd
import pytest

from analysis import schema
from analysis.results import load_results
from sweeper.cli import main


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def stopped_sweep(grid_sweep, tmp_path):
    """A copy of the finished grid sweep with its own store; one completed trial's run is tagged running."""
    from mlflow.tracking import MlflowClient

    storage, _ = grid_sweep
    copy = tmp_path / "sweeps"
    copy.mkdir()
    shutil.copytree(storage / "grid", copy / "grid")
    shutil.copy(storage / "mlflow.db", copy / "mlflow.db")
    shutil.copytree(storage / "mlartifacts" / "grid", copy / "mlartifacts" / "grid")
    meta = schema.read_meta(copy, "grid")
    meta.storage, meta.mlflow_uri = str(copy), f"sqlite:///{copy}/mlflow.db"
    schema.write_meta(copy, "grid", meta)
    df = load_results("grid", copy, source="mlflow")
    row = df[df["status"] == "completed"].sort_values(["theta", "kappa"]).iloc[0]
    MlflowClient(meta.mlflow_uri).set_tag(row["run_id"], schema.TAG_STATUS, "running")
    return copy, row["trial_key"]


def set_driver(storage, pid: int) -> None:
    meta = schema.read_meta(storage, "grid")
    meta.driver = {"host": socket.gethostname(), "pid": pid}
    schema.write_meta(storage, "grid", meta)


def views(storage, out, capsys) -> dict[str, object]:
    """The stopped trial's status as status, frontier and report show it."""
    st = str(storage)
    capsys.readouterr()
    assert main(["status", "grid", "--storage", st]) == 0
    status = capsys.readouterr().out
    assert main(["frontier", "grid", "--storage", st, "--group-by", "none"]) == 0
    frontier = capsys.readouterr().out
    assert main(["report", "grid", "--storage", st, "--out", str(out), "--no-log-to-mlflow"]) == 0
    capsys.readouterr()
    return {
        "status": status,
        "frontier": frontier,
        "csv": pd.read_csv(out / "results.csv"),
        "summary": (out / "summary.md").read_text(),
    }


def test_a_stopped_trial_reads_the_same_in_status_frontier_and_report(stopped_sweep, tmp_path, capsys):
    storage, key = stopped_sweep
    set_driver(storage, dead_pid())  # the driver is gone: the run still marked running was interrupted
    v = views(storage, tmp_path / "rep1", capsys)
    assert "3 completed, 2 diverged, 0 failed, 0 running, 1 interrupted, 0 pending, 6 total" in v["status"], v["status"]
    assert "not completed (3)" in v["frontier"] and "interrupted" in v["frontier"], v["frontier"]
    assert "running" not in v["frontier"]
    csv = v["csv"].set_index("trial_key")
    assert csv.loc[key, "status"] == "interrupted" and (csv["status"] == "running").sum() == 0
    assert "1 interrupted" in v["summary"] and "| interrupted |" in v["summary"]

    set_driver(storage, os.getpid())  # a live driver: the same run is running, in every view again
    v = views(storage, tmp_path / "rep2", capsys)
    assert "0 failed, 1 running, 0 interrupted" in v["status"], v["status"]
    assert "running" in v["frontier"] and "interrupted" not in v["frontier"], v["frontier"]
    assert v["csv"].set_index("trial_key").loc[key, "status"] == "running"
    assert "1 running" in v["summary"]


def test_the_rule_itself():
    assert schema.trial_status("running", alive=False) == "interrupted"
    assert schema.trial_status(None, alive=False) == "interrupted"  # no tag yet: a run that started
    assert schema.trial_status("running", alive=True) == "running"
    for final in ("completed", "diverged", "failed", "pending"):
        assert schema.trial_status(final, alive=False) == final
    meta = schema.SweepMeta(name="x", storage="/tmp", mlflow_uri="sqlite:////tmp/x.db", spec={}, n_trials=1)
    assert schema.driver_alive(meta)  # no driver recorded: unknown, so alive
    meta.driver = {"host": socket.gethostname(), "pid": dead_pid()}
    assert not schema.driver_alive(meta)
    meta.driver = {"host": "another-host", "pid": 1}
    assert schema.driver_alive(meta)  # another machine's process cannot be checked from here
