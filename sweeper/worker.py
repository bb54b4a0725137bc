"""What runs inside Ray workers: the trainable of a grid trial (and of the closed-form kinds), its
final report, and the signal that stops Ray retrying a deterministic error.

Trials checkpoint every epoch through :class:`trainables.training.train.Trial`, so an interrupted trial continues
from its last epoch and a finished one is never re-run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainables import trial_kind
from trainables.config import SweeperError

from . import tracking

# What a trial's checkpoint holds for the driver's MLflow logging (:mod:`.run_logger`): the trial's key and epochs
# so far, and in its final checkpoint the final result, with the artifact files in ARTIFACTS beside it.
RECORD = "sweeper_record.json"
ARTIFACTS = "artifacts"
# The finished trials of a resumed sweep, from MLflow, written by the driver before Tune restarts anything
# (:func:`.run_logger.write_finished`): a worker holds no MLflow client, and must not train them again.
FINISHED = "finished.json"
# The MLflow run id of a trial, written into its folder by the driver when the run is opened.
RUN_ID = "mlflow_run_id"


def trainable(config: dict[str, Any]) -> None:
    """One trial inside Ray Tune: resume from Tune's checkpoint, train, report each epoch with a checkpoint.

    ``config["trial"]`` is the TrialConfig dict, ``config["sweep"]`` the tracking settings (kept in the param
    space so a restored Tuner has them). The driver logs to MLflow from the reports and checkpoints
    (:mod:`.run_logger`), so this process never imports MLflow (~1.3 CPU-s per worker). Sweeps started by an
    older version log here, as they did. Imports stay inside: workers import on demand.
    """
    import logging
    import tempfile

    import torch
    from ray import tune

    sweep = config["sweep"]
    if not sweep.get("driver_logs"):  # its Tuner, restored, has no driver-side logger
        return _trainable_logging_here(config)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one INFO line per checkpoint otherwise
    cfg, key = _config_and_key(config["trial"], sweep)
    iterative = trial_kind(config["trial"].get("kind", "network")).iterative
    torch.set_num_threads(cfg.threads if iterative else max(1, int(sweep["threads"])))
    stored = finished_run(sweep, key)
    if stored is not None:  # it finished before an interrupt: never re-run, and report it only if Ray lacks it
        if not final_recorded(sweep, tune.get_context().get_trial_id(), key):
            tune.report(final_report(stored["metrics"], stored["status"], key, stored.get("run_id", "")))
        return

    def report(metrics: dict[str, Any], history: list[dict[str, Any]], save=None, result=None) -> None:
        with tempfile.TemporaryDirectory() as d:
            if save is not None:
                save(Path(d) / "trial.pt")
            write_record(Path(d), key, history, result)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    if not iterative:  # kernel and linear trials: one dense computation, reported once
        from trainables import run_any

        try:
            result = run_any(cfg)
        except Exception as e:
            _fail(e, key)
            raise
        report(final_report(result.metrics, result.status, key, run_id(sweep)), result.history, result=result)
        return
    try:
        trial, resumed = _restored(cfg)
        if resumed and trial.done:  # only the final report carries a finished trial: Ray has it already
            return
        while not trial.done:
            metrics = trial.train_epoch()
            if not trial.done:  # the final report, below, carries the last epoch
                report(
                    {**metrics, "status": "running", "trial_key": key, "node_id": _node()}, trial.history, trial.save
                )
        trial.analyze()
        result = trial.result()
    except Exception as e:
        _fail(e, key)
        raise
    report(final_report(result.metrics, result.status, key, run_id(sweep)), trial.history, trial.save, result)


def _restored(cfg):
    """The trial of ``cfg`` at Tune's checkpoint, if any: (trial, whether a checkpoint was loaded)."""
    from ray import tune

    from trainables.training.train import Trial

    trial = Trial(cfg)
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            trial.load(Path(d) / "trial.pt")
    return trial, ckpt is not None


def write_record(folder: Path, key: str, history: list[dict[str, Any]], result=None) -> None:
    """What the driver logs from a checkpoint: the epochs so far and, with ``result``, the final and its
    artifacts (the files :func:`.tracking.write_artifacts` makes)."""
    rec: dict[str, Any] = {"trial_key": key, "history": history}
    if result is not None:
        art = folder / ARTIFACTS
        art.mkdir()
        tracking.write_artifacts(result, art)
        rec["final"] = {"metrics": result.metrics, "status": result.status, "diverged_epoch": result.diverged_epoch}
    (folder / RECORD).write_text(json.dumps(rec, default=float))


def finished_run(sweep: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The stored final (status, metrics, run id) of a trial that finished before the sweep was resumed."""
    from analysis.schema import read_text

    text = read_text(sweep["storage"], f"{sweep['name']}/{FINISHED}")
    return json.loads(text).get(key) if text else None


def run_id(sweep: dict[str, Any]) -> str:
    """This trial's MLflow run id, as the driver wrote it when it opened the run ('' if it could not)."""
    from ray import tune

    from analysis.schema import read_text

    trial_id = tune.get_context().get_trial_id()
    return (read_text(sweep["storage"], f"{sweep['name']}/{trial_folder(trial_id)}/{RUN_ID}") or "").strip()


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _config(trial: dict[str, Any]):
    """A trial's validated config (any kind); a config that cannot be valid anywhere fails at once, not retried
    (:func:`_fail`)."""
    from trainables import make_config

    try:
        return make_config(trial)
    except SweeperError as e:
        _fail(e, "")
        raise


def _config_and_key(trial: dict[str, Any], sweep: dict[str, Any]):
    """A trial's validated config and its key (the one its MLflow run is found by)."""
    from trainables.record import trial_key

    cfg = _config(trial)
    return cfg, trial_key(cfg.to_dict(), sweep.get("key_format", 1))


def _trainable_logging_here(config: dict[str, Any]) -> None:
    """A trial of a sweep started by an older version (no driver-side logger in its restored Tuner): it logs
    to MLflow itself, as it did then."""
    import logging
    import tempfile

    import torch
    from ray import tune

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one INFO line per checkpoint otherwise
    sweep = config["sweep"]
    if not trial_kind(config["trial"].get("kind", "network")).iterative:
        torch.set_num_threads(max(1, int(sweep["threads"])))
        return _closed_form_trial(config["trial"], sweep)
    cfg, tracker = _config_and_tracker(config["trial"], sweep)
    torch.set_num_threads(cfg.threads)  # the config's count: the same numbers as `sweeper trial`
    if tracker.finished:  # it finished before an interrupt: never re-run, and report it only if Ray lacks it
        _report_stored_final(tracker, sweep)
        return
    try:
        trial, resumed = _restored(cfg)
    except Exception as e:  # before training: the run is marked failed here, as train_tracked does later
        tracker.log_failure(e)
        _fail(e, tracker.key)
        raise
    if resumed and trial.done:  # only the final report carries a finished trial: Ray has it already
        return

    def report(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as d:
            trial.save(Path(d) / "trial.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    def after_epoch(metrics: dict[str, Any]) -> None:
        if not trial.done:  # the final report, below, carries the last epoch
            report({**metrics, "status": "running", "trial_key": tracker.key})

    try:
        result = tracking.train_tracked(trial, tracker, after_epoch)
    except Exception as e:
        _fail(e, tracker.key)
        raise
    report(_final_metrics(result, tracker))


def _fail(error: BaseException, key: str) -> None:
    """Before a trial's error propagates: a deterministic one (a :class:`SweeperError`: bad config or data)
    is reported as such, so :class:`NoRetry` stops Ray from retrying what would fail the same way again."""
    from ray import tune

    if isinstance(error, SweeperError):
        tune.report(
            {
                "status": "failed",
                "error": f"{type(error).__name__}: {error}"[:2000],
                "trial_key": key,
                "deterministic": 1,
            }
        )


def no_retry_callback():
    """A Tune callback: a trial that reported a deterministic error gets no retry (Ray retries every
    error up to ``max_failures``; node loss deserves it, a missing file or a bad config does not)."""
    from ray import tune

    class NoRetry(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("deterministic"):  # the error that follows this report ends the trial
                trial.max_failures = trial.run_metadata.num_failures

    return NoRetry()


def _config_and_tracker(trial: dict[str, Any], sweep: dict[str, Any]):
    """A trial's validated config (:func:`_config`) and its MLflow tracker, as the worker-side logging opens them."""
    from ray import tune

    cfg = _config(trial)
    return cfg, tracking.sweep_tracker(sweep, cfg.to_dict(), tune.get_context().get_trial_id(), trial)


def _closed_form_trial(trial: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Kernel and linear trials: one dense computation, logged and reported once."""
    from ray import tune

    from trainables import run_any

    cfg, tracker = _config_and_tracker(trial, sweep)
    if tracker.finished:
        _report_stored_final(tracker, sweep)
        return
    try:
        result = run_any(cfg)
        tracker.log_final(result)
    except Exception as e:
        tracker.log_failure(e)
        _fail(e, tracker.key)
        raise
    tune.report(_final_metrics(result, tracker))


def _final_metrics(result, tracker: tracking.TrialTracker) -> dict[str, Any]:
    """A trial's last report: final metrics, status, its MLflow run and the node it ran on."""
    return final_report(result.metrics, result.status, tracker.key, tracker.run_id or "")


def final_report(metrics: dict[str, Any], status: str, key: str, mlflow_run_id: str) -> dict[str, Any]:
    """The one shape of a trial's final report, whether it just ran or its MLflow run had finished before."""
    objectives = {"clean_acc": float("nan"), "asr": float("nan")}  # a diverged trial has none: NaN for searchers
    return {
        **objectives,
        **metrics,
        "status": status,
        "trial_key": key,
        "diverged": int(status == "diverged"),
        "mlflow_run_id": mlflow_run_id,
        "node_id": _node(),
    }


def _report_stored_final(tracker: tracking.TrialTracker, sweep: dict[str, Any]) -> None:
    """Report a finished trial's final result from MLflow, unless Ray's record already holds it.

    A trial can finish and be reported just before an interrupt that Ray's experiment state never
    saw: on resume Tune starts it again, and reporting once more would write its final line twice.
    """
    from ray import tune

    if not final_recorded(sweep, tune.get_context().get_trial_id(), tracker.key):
        tune.report(_stored_final(tracker))


def final_recorded(sweep: dict[str, Any], trial_id: str, key: str) -> bool:
    """Whether the trial's ``result.json`` in the sweep folder holds a final (not running) report."""
    from analysis.schema import read_text

    if "storage" not in sweep:  # sweeps started by an older version: report again, harmless
        return False
    text = read_text(sweep["storage"], f"{sweep['name']}/{trial_folder(trial_id)}/result.json") or ""
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a killed driver
            continue
        if rec.get("trial_key") == key and rec.get("status", "running") != "running":
            return True
    return False


def _stored_final(tracker: tracking.TrialTracker) -> dict[str, Any]:
    """The final report of a trial whose MLflow run already finished (from that run's metrics)."""
    return final_report(tracker.final_metrics, tracker.final_status, tracker.key, tracker.run_id or "")


def quiet_worker_exit() -> None:
    """Ray worker set-up: drop the "Exception ignored in ... SystemExit" that a worker prints when
    Ray's SIGTERM handler fires inside a garbage-collection callback at shutdown (it raises
    SystemExit there, which Python can only report). Every other unraisable error is still printed."""
    import sys

    default = sys.unraisablehook

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, SystemExit):
            default(unraisable)

    sys.unraisablehook = hook


def trial_folder(trial_id: str) -> str:
    """The folder of a trial in the sweep's Ray folder (Tune's dir and name creators, final_recorded)."""
    return f"trial_{trial_id}"
