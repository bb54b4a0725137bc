"""Progress display for long local jobs (rich when on a terminal, one line per epoch otherwise)."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from trainables.config import TrialConfig
from trainables.train import TrialResult, run_trial


def _describe(m: dict) -> str:
    if "clean_acc" not in m:
        return f"loss={m.get('train_loss', float('nan')):.3f} (diverged)"
    return (f"loss={m['train_loss']:.3f} pen={m['penalty']:.3g} "
            f"clean={m['clean_acc']:.3f} asr={m['asr']:.3f}")


def run_with_progress(cfg: TrialConfig, checkpoint: Path | None = None, quiet: bool = False) -> TrialResult:
    """:func:`trainables.train.run_trial` with a progress bar on stderr (epoch, loss, clean acc, ASR)."""
    console = Console(stderr=True)
    if quiet:
        return run_trial(cfg, checkpoint=checkpoint)
    if not console.is_terminal:  # logs and CI: a plain line per epoch
        def log(m: dict) -> None:
            print(f"epoch {m['epoch']}/{cfg.epochs} {_describe(m)}", file=sys.stderr, flush=True)
        return run_trial(cfg, checkpoint=checkpoint, on_epoch=log)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("epochs", total=cfg.epochs, info="")

        def on_epoch(m: dict) -> None:
            progress.update(task, completed=m["epoch"], info=_describe(m))

        return run_trial(cfg, checkpoint=checkpoint, on_epoch=on_epoch)
