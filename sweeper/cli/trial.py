"""``sweeper trial``: one trial in this process, its options generated from the config fields."""

from __future__ import annotations

import contextlib
import inspect
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from .options import (
    Interrupted,
    Kind,
    KindOpt,
    SweeperError,
    _check_writable,
    _click_core,
    _opt,
    app,
    field_parameters,
)


def trial(
    ctx: typer.Context,
    config: Annotated[Path | None, _opt("YAML/JSON file of trial fields; explicit flags override it.")] = None,
    kind: KindOpt = Kind.network,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Any trial field FIELD=VALUE (the only way to reach kernel/linear fields such as m, r, ell); a list "
            "field takes its list as one value (--set detect_baselines=nc,ss); repeatable.",
            show_default=False,
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write {config, metrics, status, history} here.")
    ] = None,
    checkpoint: Annotated[Path | None, _opt("Checkpoint file: written every epoch, resumed from if it exists.")] = None,
    overwrite: Annotated[bool, _opt("Allow --json to replace an existing file.")] = False,
    quiet: Annotated[bool, _opt("No progress bar.")] = False,
    **fields: Any,
) -> dict[str, Any]:
    """Run one trial locally: poison, train with the penalty, evaluate, analyse (or a kernel / linear trial)."""
    from ..spaces import trial_config

    flags = {  # the field options given on the command line (a default is not a choice: the config file keeps it)
        k: v.value if isinstance(v, Enum) else v
        for k, v in ctx.params.items()
        if k in fields and ctx.get_parameter_source(k) not in (_click_core.ParameterSource.DEFAULT, None)
    }
    cfg = trial_config(kind.value, config, flags, set_)
    if json_path is not None:
        _check_writable(json_path, overwrite)
    from trainables.training.trial_result import write_json

    from ..progress import run_with_progress

    try:
        result = run_with_progress(cfg, checkpoint=checkpoint, quiet=quiet)
    except KeyboardInterrupt:
        hint = (
            f"; the checkpoint {checkpoint} holds the last finished epoch: the same command resumes from it"
            if checkpoint is not None and Path(checkpoint).is_file()
            else "; nothing was saved (pass --checkpoint FILE to make a trial resumable)"
        )
        raise Interrupted(f"trial interrupted{hint}") from None
    if json_path is not None:
        write_json(result, json_path)
    _print_summary(result)
    return result.to_json_dict()


def declare_options() -> None:
    """Give ``trial`` one option per config field (plugin fields included); called again by ``main`` after
    plugins load, since Typer reads the signature each time it builds the command."""
    own = [p for p in inspect.signature(trial, eval_str=True).parameters.values() if p.kind != p.KEYWORD_ONLY]
    trial.__signature__ = inspect.Signature([p for p in own if p.kind != p.VAR_KEYWORD] + field_parameters())


with contextlib.suppress(SweeperError):  # a failing plugin is reported by main(): one line, exit 2
    declare_options()
app.command()(trial)


def _print_summary(result) -> None:
    m = result.metrics
    from trainables import trial_kind

    if not trial_kind(getattr(result, "config", {}).get("kind", "network")).iterative:
        typer.echo("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))
        return
    keys = [
        k
        for k in (
            "clean_acc",
            "asr",
            "train_acc",
            "n_poisoned",
            "penalty",
            "fisher_trace",
            "lambda_1",
            "eig_gap",
            "overlap_sq",
            "max_overlap_sq",
            "max_overlap_index",
            "det_lambda_ratio",
            "det_ipr_max",
            "det_flip_max",
            "det_flip_class",
            "nc_anomaly_index",
            "nc_class",
            "ss_auroc",
            "ac_auroc",
            "train_seconds",
        )
        if k in m
    ]
    line = "  ".join(f"{k}={m[k]:.4g}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys)
    status = result.status + (f" at epoch {result.diverged_epoch}" if result.diverged_epoch else "")
    typer.echo(f"status={status}  {line}")
    h = result.artifacts.get("hessian")
    if h:  # which spectrum path ran, and why (auto chooses by model and memory budget)
        tail = (
            ""
            if h.get("method_used") == "exact"
            else (f", {h.get('lanczos_iterations')} Lanczos iterations, converged={h.get('converged')}")
        )
        typer.echo(f"spectrum: {h.get('method_used')} ({h.get('reason')}{tail})")
