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
from .tracking import run_label


def trainable(config: dict[str, Any]) -> None:
    """One trial inside Ray Tune: resume from Tune's checkpoint, train, log to MLflow, report.

    ``config["trial"]`` is the TrialConfig dict, ``config["sweep"]`` the tracking settings (kept in
    the param space so a restored Tuner has them). Imports stay inside: workers import on demand.
    """
    import logging
    import tempfile

    import torch
    from ray import tune

    from trainables.training.train import Trial

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
        trial = Trial(cfg)
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                trial.load(Path(d) / "trial.pt")
    except Exception as e:  # before training: the run is marked failed here, as train_tracked does later
        tracker.log_failure(e)
        _fail(e, tracker.key)
        raise
    if ckpt is not None and trial.done:  # only the final report carries a finished trial: Ray has it already
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
    """A trial's validated config (any kind) and its MLflow tracker, as every trainable opens them.

    A config that cannot be valid anywhere fails at once, not retried (:func:`_fail`).
    """
    from ray import tune

    from trainables import make_config

    try:
        cfg = make_config(trial)
    except SweeperError as e:
        _fail(e, "")
        raise
    tracker = tracking.TrialTracker(
        sweep["mlflow_uri"],
        sweep["experiment_id"],
        sweep["parent_run_id"],
        sweep["name"],
        cfg.to_dict(),
        tune.get_context().get_trial_id(),
        run_label(trial, sweep.get("axes", [])),
        key_format=sweep.get("key_format", 1),
    )
    return cfg, tracker


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
    return final_report(result.metrics, result.status, tracker)


def final_report(metrics: dict[str, Any], status: str, tracker: tracking.TrialTracker) -> dict[str, Any]:
    """The one shape of a trial's final report, whether it just ran or its MLflow run had finished before."""
    import ray

    objectives = {"clean_acc": float("nan"), "asr": float("nan")}  # a diverged trial has none: NaN for searchers
    return {
        **objectives,
        **metrics,
        "status": status,
        "trial_key": tracker.key,
        "diverged": int(status == "diverged"),
        "mlflow_run_id": tracker.run_id or "",
        "node_id": ray.get_runtime_context().get_node_id(),
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
    return final_report(tracker.final_metrics, tracker.final_status, tracker)


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
