"""Stopping a grid sweep at its trials' epoch boundaries, for SLURM's warning before the job's end.

Ctrl-C stops a sweep at once: each running trial loses the epoch in flight and continues from its last
checkpoint when resumed. When there is time to do better (SLURM warns minutes ahead), :func:`request`
asks :class:`EpochBoundaryStop`, the grid's Tune scheduler, to pause every running trial at its next
reported epoch instead: Tune saves that epoch's checkpoint and releases the trial, no other trial starts,
and once none runs the sweep stops as on Ctrl-C. Paused trials continue from there when the sweep is
resumed. A trial whose epoch outlasts the grace period is stopped as by Ctrl-C when it ends.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

_STOP = threading.Event()  # set by request(): pause each trial at its next epoch, start none
_STOPPED = threading.Event()  # SIGINT sent: the sweep is stopping


def _interrupt() -> None:
    if not _STOPPED.is_set():
        _STOPPED.set()
        os.kill(os.getpid(), signal.SIGINT)  # Tune's own stop: experiment state saved, paused trials kept


def request(grace: float) -> None:
    """Stop the running sweep at its trials' next epoch boundaries, or as by Ctrl-C after ``grace`` seconds."""
    _STOP.set()
    timer = threading.Timer(grace, _interrupt)
    timer.daemon = True
    timer.start()


def reset() -> None:
    """Forget an earlier request (a new sweep in this process)."""
    _STOP.clear()
    _STOPPED.clear()


class EpochBoundaryStop(FIFOScheduler):
    """First in, first out, until :func:`request`: then each result pauses its trial (Tune checkpoints it),
    no trial is started, and the sweep stops once no trial runs."""

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        # an epoch's report (status running), not a trial's final one: a finished trial completes as usual
        if _STOP.is_set() and result.get("status") == "running":
            return TrialScheduler.PAUSE
        return TrialScheduler.CONTINUE

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        if not _STOP.is_set():
            return super().choose_trial_to_run(tune_controller)
        if not any(t.status == Trial.RUNNING for t in tune_controller.get_trials()):
            _interrupt()  # every trial paused (checkpointed), finished or never started
        return None
