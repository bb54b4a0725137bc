"""A sweep's progress while Ray Tune runs it: a live bar on a terminal, one plain line per epoch and
per finished trial otherwise (:func:`progress_callback`)."""

from __future__ import annotations

import math
from typing import Any


def progress_callback(n_trials: int, axes: list[str], live: bool | None = None):
    """The sweep's progress without Tune's tables.

    On a terminal: one live bar (done / running / pending / failed, ETA from the finished trials)
    with a short line per finished trial, so hundreds of trials do not flood the screen. Otherwise
    (CI, logs): one plain line per trial epoch and per finished trial.
    """
    import sys

    from ray import tune

    live = sys.stdout.isatty() if live is None else live
    if live:
        stop_progress()

    def label(trial) -> str:  # the axes' values name a trial, as in the summary (Ray's ids are not shown)
        cfg = trial.config.get("trial", {})
        text = " ".join(f"{a}={_short(cfg.get(a))}" for a in axes)
        return text or str((trial.last_result or {}).get("trial_key") or trial.trial_id)

    def epoch_line(trial, result) -> str:
        from trainables.config import total_epochs

        cfg = trial.config["trial"]
        total = total_epochs(cfg["epochs"], cfg.get("defence_filter", "none")) if "epochs" in cfg else None
        stage = " (retrain)" if result.get("stage") == 2 else ""
        scores = (  # none on an epoch between evaluations (eval_every)
            f" clean={result['clean_acc']:.3f} asr={result.get('asr', float('nan')):.3f}"
            if "clean_acc" in result
            else ""
        )
        return f"{label(trial)} epoch {result.get('epoch')}/{total}{stage} loss={result.get('train_loss', float('nan')):.3f}{scores}"

    def finished_line(trial) -> str:
        r = trial.last_result or {}
        head = f"{label(trial)} {r.get('status', '?')}: clean={r.get('clean_acc', float('nan')):.3f} asr={r.get('asr', float('nan')):.3f}"
        if "models_done" in r:  # a defence: its objectives aggregated over the threats
            return f"{head} over {r.get('n_models', '?')} models"
        extra = []  # what the trial measured: a spectrum's overlap, a filter's removal (a NaN says nothing)
        if isinstance(r.get("max_overlap_sq"), int | float) and math.isfinite(r["max_overlap_sq"]):
            extra.append(f"max_overlap_sq={r['max_overlap_sq']:.3f}")
        if isinstance(r.get("filter_removed"), int | float) and math.isfinite(r["filter_removed"]):
            precision = r.get("filter_precision", float("nan"))
            extra.append(f"removed={int(r['filter_removed'])} precision={precision:.2f}")
        return " ".join([head, *extra])

    def error_line(trial) -> str:  # a deterministic error reported its message; any other is in Ray's folder
        msg = (trial.last_result or {}).get("error")
        return f"{label(trial)} failed: {msg}" if msg else f"{label(trial)} raised an error (see {trial.local_path})"

    class Plain(tune.Callback):
        def __init__(self):
            self.done: set[str] = set()

        def on_step_begin(self, iteration, trials, **info):
            # a resumed sweep's finished trials count from the first line on (the callback is restored empty)
            self.done |= {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("status") == "running" and "models_done" in result:
                print(
                    f"[{len(self.done)}/{n_trials} done] {label(trial)}: {result['models_done']}/"
                    f"{result.get('n_models')} models trained",
                    flush=True,
                )
            elif result.get("status") == "running":
                print(f"[{len(self.done)}/{n_trials} done] {epoch_line(trial, result)}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            if "epoch" in r and r.get("status") != "running":  # the final report carries the last epoch
                print(f"[{len(self.done)}/{n_trials} done] {epoch_line(trial, r)}", flush=True)
            self.done.add(trial.trial_id)
            print(f"[{len(self.done)}/{n_trials} done] {finished_line(trial)}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[{len(self.done)}/{n_trials} done] {error_line(trial)}", flush=True)

    class Live(tune.Callback):
        def __init__(self):
            self.bar = None  # made on the first step: Tune pickles its callbacks, a live display cannot be

        def __getstate__(self):
            return {"bar": None}

        def _start(self):
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.console = Console()
            self.bar = Progress(
                TextColumn("[bold]trials"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[counts]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.bar.add_task("trials", total=n_trials, counts="")
            self.bar.start()
            _LIVE.append(self)

        def on_step_begin(self, iteration, trials, **info):
            if self.bar is None:
                self._start()
            by = {s: sum(t.status == s for t in trials) for s in ("TERMINATED", "RUNNING", "ERROR")}
            pending = n_trials - sum(by.values())
            self.bar.update(
                self.task,
                completed=by["TERMINATED"] + by["ERROR"],
                counts=f"{by['RUNNING']} running, {pending} pending, {by['ERROR']} failed",
            )

        def on_trial_complete(self, iteration, trials, trial, **info):
            if self.bar is not None:
                self.console.print(finished_line(trial))

        def on_trial_error(self, iteration, trials, trial, **info):
            if self.bar is not None:
                self.console.print(error_line(trial))

        def on_experiment_end(self, trials, **info):
            if self.bar is not None:
                self.on_step_begin(0, trials)  # the final counts
                self.bar.stop()

    return Live() if live else Plain()


def _short(value: Any) -> Any:
    """A value as a progress line shows it: floats to 4 significant digits (a search's kappa=122.96, not
    122.96071107325702)."""
    return f"{value:.4g}" if isinstance(value, float) else value


_LIVE: list[Any] = []  # live bars of the running tuner, stopped before the summary is printed


def stop_progress() -> None:
    """Stop any live progress bar (an interrupted tuner never calls ``on_experiment_end``)."""
    while _LIVE:
        _LIVE.pop().bar.stop()
