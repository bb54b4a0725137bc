"""The driver logs grid trials to MLflow (sweeper.run_logger): a resumed sweep's finished trials are found without
MLflow in the worker, no trial worker imports MLflow, and a sweep started before driver-side logging still logs
from its workers. That the runs hold every epoch, final metric, artifact and tag is checked on the grid sweep
(test_orchestrate, test_results)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mlflow.tracking import MlflowClient

from analysis.schema import read_meta, trial_runs
from sweeper import orchestrate, tracking
from sweeper.orchestrate import SweepOptions, run_sweep
from sweeper.run_logger import write_finished
from sweeper.spaces import SweepSpec
from sweeper.worker import FINISHED, finished_run
from tests.conftest import FAST


def test_a_resumed_sweeps_finished_trials_are_read_from_mlflow_before_any_worker_starts(grid_sweep, tmp_path):
    storage, report = grid_sweep
    meta = read_meta(storage, "grid")
    settings = {**orchestrate._sweep_settings(meta), "storage": str(tmp_path)}  # written beside, not in the fixture
    write_finished(settings)
    stored = json.loads((tmp_path / "grid" / FINISHED).read_text())
    assert len(stored) == 6 and {v["status"] for v in stored.values()} == {"completed", "diverged"}
    for row in report.rows:
        got = finished_run(settings, row["trial_key"])
        assert got["status"] == row["status"] and got["run_id"]
        if row["status"] == "completed":
            assert got["metrics"]["clean_acc"] == row["clean_acc"]
    assert finished_run(settings, "no-such-key") is None
    assert finished_run({**settings, "name": "none"}, report.rows[0]["trial_key"]) is None  # a new sweep: no file


def _trial_worker_logs(folder: Path) -> set[Path]:
    """The stderr files of the session's trial workers (those that imported the training code)."""
    return {
        p for p in folder.glob("worker-*.err") if re.search(r"\|\s+trainables\.training\.train$", p.read_text(), re.M)
    }


def _imports_mlflow(log: Path) -> bool:
    return re.search(r"\|\s+mlflow$", log.read_text(), re.M) is not None


def test_trial_workers_import_no_mlflow_but_those_of_a_sweep_started_before_still_log_themselves(tmp_path, monkeypatch):
    """Python's import log of every process this test's Ray starts, read from each worker's stderr file: a sweep's
    trial worker imports the training code and no MLflow module. A sweep started before driver-side logging (no
    ``driver_logs`` in its settings, so no RunLogger in its Tuner) still logs every epoch, its final and its
    artifacts, from its worker, which does import MLflow: the check can fail."""
    import ray

    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # inherited by the processes of the Ray started below
    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    spec = SweepSpec(axes={"theta": [0.1]}, fixed={**FAST, "kappa": 0.0, "geometry": False, "epochs": 2})
    try:
        report = run_sweep(spec, SweepOptions(name="new", storage=str(tmp_path), verbose=0, max_concurrent=1))
        assert report.counts["completed"] == 1, report.rows
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        new = _trial_worker_logs(logs)
        assert len(new) == 1 and not _imports_mlflow(next(iter(new)))
        # the sweep's Tuner had no TensorBoard logger; a Tuner of the caller's own, later, gets Tune's usual ones
        assert "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ

        old = orchestrate._sweep_settings

        def settings_of_an_older_version(meta):
            out = old(meta)
            out.pop("driver_logs", None)
            return out

        monkeypatch.setattr(orchestrate, "_sweep_settings", settings_of_an_older_version)
        report = run_sweep(spec, SweepOptions(name="old", storage=str(tmp_path), verbose=0, max_concurrent=1))
        assert report.counts["completed"] == 1, report.rows
        (worker,) = _trial_worker_logs(logs) - new
        assert _imports_mlflow(worker)
    finally:
        ray.shutdown()  # its processes log their imports: not one for the next test
    c = MlflowClient(tracking.default_uri(tmp_path))
    for name in ("new", "old"):
        meta = read_meta(tmp_path, name)
        (run,) = trial_runs(meta.mlflow_uri, meta.experiment_id)
        assert [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")] == [1, 2], name
        assert run.data.tags["sweeper.status"] == "completed", name
        assert "spectrum.json" in {a.path for a in c.list_artifacts(run.info.run_id)}, name
