"""Progress display for long local jobs (rich when on a terminal, one line per epoch otherwise)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from trainables.config import TrialConfig
from trainables.training.train import run_trial
from trainables.training.trial_result import TrialResult


def _describe(m: dict) -> str:
    loss = m.get("train_loss", float("nan"))
    if not math.isfinite(loss):
        return f"loss={loss:.3f} (diverged)"
    if "clean_acc" not in m:  # an epoch between evaluations (eval_every)
        return f"loss={loss:.3f} pen={m['penalty']:.3g}"
    return f"loss={loss:.3f} pen={m['penalty']:.3g} clean={m['clean_acc']:.3f} asr={m['asr']:.3f}"


def run_with_progress(cfg: TrialConfig, checkpoint: Path | None = None, quiet: bool = False) -> TrialResult:
    """:func:`trainables.training.train.run_trial` with a progress bar on stderr (epoch, loss, clean acc, ASR);
    kernel and linear trials (one dense computation) run as they are."""
    from trainables import run_any, trial_kind

    if not trial_kind(getattr(cfg, "kind", "network")).iterative:
        return run_any(cfg)
    console = Console(stderr=True)
    if quiet:
        return run_trial(cfg, checkpoint=checkpoint)
    if not console.is_terminal:  # logs and CI: a plain line per epoch, one per 5 Lanczos steps

        def log(m: dict) -> None:
            print(f"epoch {m['epoch']}/{cfg.total_epochs} {_describe(m)}", file=sys.stderr, flush=True)

        def log_lanczos(i: int) -> None:  # i counts steps over every round (20 + 40 + 80 + 160 at most)
            if i == 1 or i % 5 == 0 or i == cfg.hessian_iterations:
                print(
                    f"input-Hessian Lanczos step {i} (first round {cfg.hessian_iterations}, "
                    f"restarts until residuals <= {cfg.hessian_tol:g})",
                    file=sys.stderr,
                    flush=True,
                )

        return run_trial(cfg, checkpoint=checkpoint, on_epoch=log, on_lanczos=log_lanczos)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("epochs", total=cfg.total_epochs, info="")
        lanczos = progress.add_task("Lanczos", total=cfg.hessian_iterations, info="input Hessian", visible=False)

        def on_epoch(m: dict) -> None:
            progress.update(task, completed=m["epoch"], info=_describe(m))

        def on_lanczos(i: int) -> None:  # a restart (residuals above hessian_tol) extends the bar
            total = next(t.total for t in progress.tasks if t.id == lanczos) or cfg.hessian_iterations
            progress.update(lanczos, completed=i, total=total if i <= total else 3 * total, visible=True)

        return run_trial(cfg, checkpoint=checkpoint, on_epoch=on_epoch, on_lanczos=on_lanczos)
