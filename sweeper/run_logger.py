"""The driver logs a grid sweep's trials to MLflow: a Ray Tune callback, so no trial worker imports MLflow.

Importing MLflow and opening its store cost a worker ~1.3 CPU-s, as much as a 5-epoch digits trial's own
compute. The driver holds the sweep's client already. What it logs comes from what Tune hands it:

- a trial starts (and each retry): its run is found by the trial's key or created (:class:`.tracking.TrialTracker`),
  and the run id is written into the trial's folder (:data:`.worker.RUN_ID`), where the final report and the
  Ray-folder reader find it;
- each checkpoint Tune has persisted carries :data:`.worker.RECORD`: the epochs so far, logged when the run lacks
  them (epochs a killed driver missed are logged from the next checkpoint), and in the final checkpoint the
  final metrics, status and artifacts, which close the run;
- a trial that raises marks its run failed (a retry reopens it).

Everything is logged synchronously in Tune's event loop, before Tune saves its experiment state: a trial that
state records as finished has its run closed. A resumed sweep's finished runs are written to
:data:`.worker.FINISHED` before Tune restarts anything, so a trial whose end Tune's state missed is reported from
MLflow and never trained again.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from analysis.schema import write_text
from trainables.record import FINAL_STATUSES, TAG_KEY, TAG_PARENT_RUN, TAG_STATUS

from . import tracking
from .worker import ARTIFACTS, FINISHED, RECORD, RUN_ID, trial_folder

log = logging.getLogger("sweeper.run_logger")


def _never_raises(handler):
    """A callback that raises stops Tune's loop, the whole sweep with it: logging fails as a warning instead
    (MLflow's own calls are retried and warn already; this is for anything else)."""
    import functools

    @functools.wraps(handler)
    def wrapped(self, iteration, trials, trial, *args, **info):
        try:
            handler(self, iteration, trials, trial, *args, **info)
        except Exception as e:
            log.warning("logging trial %s to MLflow: %s: %s", trial.trial_id, type(e).__name__, e)

    return wrapped


class RunLogger(tune.Callback):
    """Logs each trial of a grid sweep into its MLflow child run, from the driver."""

    def __init__(self, sweep: dict[str, Any]):
        self.sweep = sweep  # the trials' tracking settings (orchestrate's _sweep_settings)
        self.trackers: dict[str, tracking.TrialTracker] = {}

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment: no MLflow clients
        return {"sweep": self.sweep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.sweep, self.trackers = state["sweep"], {}

    def _tracker(self, trial) -> tracking.TrialTracker | None:
        """The trial's tracker, opened on its first event (a restored driver gets no start for a paused trial)."""
        if trial.trial_id not in self.trackers:
            self._open(trial)
        return self.trackers.get(trial.trial_id)

    def _open(self, trial) -> None:
        from trainables import make_config
        from trainables.config import SweeperError

        s = self.sweep
        try:
            cfg = make_config(trial.config["trial"]).to_dict()
        except SweeperError:  # the worker fails it as deterministic: no run, as before it ever trained
            return
        tracker = tracking.sweep_tracker(s, cfg, trial.trial_id, trial.config["trial"], node="")  # node: reports
        self.trackers[trial.trial_id] = tracker
        if tracker.run_id:
            _write(s, f"{trial_folder(trial.trial_id)}/{RUN_ID}", tracker.run_id)

    @_never_raises
    def on_trial_start(self, iteration, trials, trial, **info):
        self._open(trial)  # each start and retry: the run is found again and marked running

    @_never_raises
    def on_trial_result(self, iteration, trials, trial, result, **info):
        tracker = self._tracker(trial)
        if tracker is not None:
            tracker.set_node(str(result.get("node_id", "")))

    @_never_raises
    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        tracker = self._tracker(trial)
        if tracker is None or tracker.finished:
            return
        fs, path = checkpoint.filesystem, checkpoint.path
        try:
            with fs.open_input_stream(f"{path}/{RECORD}") as f:
                rec = json.loads(f.read().decode())
        except (OSError, ValueError) as e:  # not a sweeper trial's checkpoint, or unreadable: nothing to log
            log.warning("trial %s: no record in checkpoint %s: %s", trial.trial_id, path, e)
            return
        final = rec.get("final")
        if final is None:
            for past in rec.get("history", []):
                tracker.log_epoch(past)
            return
        with tempfile.TemporaryDirectory() as tmp:
            folder = _local_folder(fs, f"{path}/{ARTIFACTS}", Path(tmp))
            files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
            tracker.close(final["metrics"], rec.get("history", []), final["status"], final.get("diverged_epoch"), files)

    @_never_raises
    def on_trial_recover(self, iteration, trials, trial, **info):
        self._failed(trial)  # retried: the next start reopens the run

    @_never_raises
    def on_trial_error(self, iteration, trials, trial, **info):
        self._failed(trial)

    def _failed(self, trial) -> None:
        from .states import error_text

        tracker = self.trackers.get(trial.trial_id)
        if tracker is not None and not tracker.finished:
            tracker.log_failure(error_text(trial.get_error(), trial.last_result or {}) or "the trial raised")


def _local_folder(fs, path: str, tmp: Path) -> Path:
    """``path`` on ``fs`` as a local folder: itself on a local filesystem, else copied under ``tmp``."""
    import pyarrow.fs

    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        return Path(path)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return tmp / "absent"
    pyarrow.fs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
    return tmp


def _write(sweep: dict[str, Any], relpath: str, text: str) -> None:
    """Write ``<storage>/<sweep>/<relpath>``; a failure is a warning (what reads it copes without)."""
    try:
        write_text(sweep["storage"], f"{sweep['name']}/{relpath}", text)
    except OSError as e:
        log.warning("could not write %s: %s", relpath, e)


def write_finished(sweep: dict[str, Any]) -> None:
    """Before a resumed grid sweep restarts anything: the finished runs of its trials (key -> status, final
    metrics, run id) into :data:`.worker.FINISHED`, where each worker looks before it trains."""
    from analysis.schema import trial_runs

    from .tracking import retry

    runs = retry(lambda: trial_runs(sweep["mlflow_uri"], sweep["experiment_id"]), "reading the finished trials")
    if runs is None:  # MLflow failed: a file written before holds a subset of what finished, never a wrong entry
        return
    finished = {
        r.data.tags.get(TAG_KEY): {
            "status": r.data.tags.get(TAG_STATUS),
            "metrics": dict(r.data.metrics),
            "run_id": r.info.run_id,
        }
        for r in runs
        if r.data.tags.get(TAG_PARENT_RUN) == sweep["parent_run_id"] and r.data.tags.get(TAG_STATUS) in FINAL_STATUSES
    }
    _write(sweep, FINISHED, json.dumps(finished, default=float))
