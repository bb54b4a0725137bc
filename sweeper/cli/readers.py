"""The commands that read finished sweeps: ``frontier``, ``detect``, ``report``, ``theory``, ``ui``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .options import (
    Interrupted,
    MlflowOpt,
    StorageOpt,
    SweeperError,
    app,
)
from .sweeps import Aggregate


@app.command("frontier")
def frontier_cmd(
    name: Annotated[str, typer.Argument(help="Sweep name (a folder under --storage / an MLflow experiment).")],
    objectives: Annotated[
        str | None,
        typer.Option(
            help="METRIC:max|min, comma-separated (2 or more) \\[default: the trial kind's, clean_acc:max,asr:min for networks].",
            show_default=False,
        ),
    ] = None,
    group_by: Annotated[
        str | None,
        typer.Option(
            help="Columns to compute one frontier per group, e.g. theta or augment,epochs; none for one global frontier \\[default: the attack fields that vary].",
            show_default=False,
        ),
    ] = None,
    aggregate_seeds: Annotated[
        bool | None,
        typer.Option(
            "--aggregate-seeds/--per-seed",
            help="Average the seeds of each configuration (mean, std, n_seeds) before the frontier, or keep one point per seed \\[default: average when a configuration ran with several seeds].",
            show_default=False,
        ),
    ] = None,
    csv: Annotated[
        Path | None,
        typer.Option(help="Also write the frontier as CSV here (refuses to overwrite).", show_default=False),
    ] = None,
    storage: StorageOpt = "./sweeps",
    mlflow_uri: MlflowOpt = None,
    source: Annotated[str, typer.Option(help="auto (MLflow, else the Ray folder), mlflow or ray.")] = "auto",
    threats: Annotated[
        Aggregate | None,
        typer.Option(
            help="Defence searches: combine each objective over the threats by worst case or mean \\[default: the search's].",
            show_default=False,
        ),
    ] = None,
) -> dict[str, Any]:
    """Print a sweep's safety-efficacy frontier as a table (a defence search's: over its defences,
    with the frontier defences' per-threat values)."""
    from analysis.frontier import sweep_frontier  # not analysis.report: matplotlib (0.4 s) is not needed to print it

    if csv is not None and csv.exists():
        raise SweeperError(f"--csv {csv} already exists; refusing to overwrite it")
    res = sweep_frontier(
        name, storage, mlflow_uri, source, objectives, group_by, aggregate_seeds, threats.value if threats else None
    )
    front, objs, groups = res["frontier"], res["objectives"], res["groups"]
    metrics = [m for m, _ in objs]
    defence = "detail" in res
    shown = [
        c for c in [*(["defence_key"] if defence else []), *res["varying"], "n_seeds", *groups] if c in front.columns
    ]
    shown = list(
        dict.fromkeys(
            shown
            + [c for m in metrics for c in (m, f"{m}_std") if c in front.columns]
            + [c for c in ("n_models", "n_diverged") if defence and c in front.columns]
        )
    )
    if res["source"] and not res["source"].startswith("mlflow"):
        typer.echo(f"(read from {res['source']})", err=True)
    what = (
        ", ".join(f"{o.metric} {o.direction} ({o.aggregate} over threats)" for o in res["aggregation"])
        if defence
        else ", ".join(f"{m} {d}" for m, d in objs)
    )
    unit = "completed defences" if defence else "completed trials"
    points = (
        f"{len(front)} configurations (each the mean of its seeds) from {res['n_completed']} {unit}"
        if "n_seeds" in front.columns and not defence
        else f"{len(front)} of {res['n_completed']} {unit}"
    )
    typer.echo(f"frontier of {name} ({what}" + (f"; per {', '.join(groups)}" if groups else "") + f"): {points}")
    typer.echo(front[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}") if not front.empty else "(empty)")
    if defence and not res["detail"].empty:
        typer.echo("\nper threat (mean over seeds) of the frontier's defences:")
        typer.echo(res["detail"].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    families = res.get("families")
    if families is not None and not families.empty:
        from analysis.families import MAX_DROP

        typer.echo(
            f"\neach defence family's best (seed means; the lowest ASR within {MAX_DROP:g} of the undefended "
            "clean accuracy, else the lowest ASR):"
        )
        cols = [c for c in families.columns if c not in ("pre_filter_clean_acc", "pre_filter_asr")]
        typer.echo(families[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    skipped = res["unfinished"]
    if not skipped.empty:
        typer.echo(
            f"not completed ({len(skipped)}): "
            + ", ".join(f"{_point(r, res['varying'])} {r['status']}" for _, r in skipped.iterrows())
        )
    if csv is not None:
        front.to_csv(csv, index=False)
    return {"frontier": front, "detail": res.get("detail")}


def _point(row, varying: list[str]) -> str:
    """A trial (or defence) named by its varying values, as the progress lines and summaries name it; its key
    only when nothing varies."""
    import pandas as pd

    def short(v):
        return f"{v:.4g}" if isinstance(v, float) else v

    shown = [
        f"{k}={short(row[k])}" for k in varying if k in row and not (isinstance(row[k], float) and pd.isna(row[k]))
    ]
    return " ".join(shown) or str(row.get("defence_key") or row.get("trial_key"))


@app.command()
def detect(
    name: Annotated[str, typer.Argument(help="Sweep name: clean (theta 0) and poisoned models, several seeds each.")],
    statistics: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated statistics \\[default: every detection score in the results, then the oracles].",
            show_default=False,
        ),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option(help="Bootstrap resamples of the AUROC's 95% interval.", min=100, max=100_000)
    ] = 1000,
    csv: Annotated[
        Path | None, typer.Option(help="Also write the table as CSV here (refuses to overwrite).", show_default=False)
    ] = None,
    storage: StorageOpt = "./sweeps",
    mlflow_uri: MlflowOpt = None,
    source: Annotated[str, typer.Option(help="auto (MLflow, else the Ray folder), mlflow or ray.")] = "auto",
) -> dict[str, Any]:
    """Score every detection statistic over the sweep's populations of models: AUROC [95% CI] and TPR at
    5% FPR per statistic x theta x defence settings, and the detectability lag."""
    from analysis.detect import detect_sweep

    if csv is not None and csv.exists():
        raise SweeperError(f"--csv {csv} already exists; refusing to overwrite it")
    res = detect_sweep(
        name, storage, mlflow_uri, source, statistics, bootstrap, progress=lambda line: typer.echo(line, err=True)
    )
    if res["source"] and not res["source"].startswith("mlflow"):
        typer.echo(f"(read from {res['source']})", err=True)
    typer.echo(res["text"])
    if csv is not None:
        res["table"].to_csv(csv, index=False)
    return {"table": res["table"], "lag": res["lag"]}


@app.command()
def report(
    name: Annotated[str, typer.Argument(help="Sweep name.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for figures and summary \\[default: <storage>/<name>-report].", show_default=False),
    ] = None,
    storage: StorageOpt = "./sweeps",
    mlflow_uri: MlflowOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Write into a non-empty --out folder.")] = False,
    log_to_mlflow: Annotated[bool, typer.Option(help="Log the report to the sweep's parent MLflow run.")] = True,
    source: Annotated[str, typer.Option(help="auto (MLflow, else the Ray folder), mlflow or ray.")] = "auto",
) -> dict[str, Any]:
    """Write every figure (PNG + SVG) and a one-page Markdown + HTML summary; log them to MLflow."""
    from analysis.report import write_report
    from analysis.schema import local_folder

    folder = out if out is not None else (local_folder(storage, f"{name}-report") or Path(f"{name}-report").absolute())
    res = write_report(
        name,
        folder,
        storage,
        mlflow_uri,
        overwrite=overwrite,
        log_to_mlflow=log_to_mlflow,
        source=source,
        progress=lambda line: typer.echo(line, err=True),
    )
    for note in res["notes"]:  # where it read from when MLflow did not answer, and what it left out
        typer.echo(f"({note})", err=True)
    typer.echo(
        f"report of {name}: {len([f for f in res['figures'] if f.suffix == '.png'])} figures, "
        f"{res['out'] / 'summary.md'}, {res['out'] / 'summary.html'}"
        + (f"; logged to MLflow run {res['mlflow_parent_run']}" if res["mlflow_parent_run"] else "")
    )
    if not res["problems"].empty:
        typer.echo(f"not completed: {len(res['problems'])} trial(s), listed in the summary")
    return {"out": str(res["out"])}


@app.command()
def theory(
    out: Annotated[Path, typer.Option(help="Folder for theory.png/.svg, by_m.csv, by_r.csv and summary.json.")] = Path(
        "theory"
    ),
    m: Annotated[
        str, typer.Option(help="Poison counts (include 0 for the small-m slope).")
    ] = "0,1,2,4,8,16,32,64,128,256,512,1024,4096",
    r: Annotated[str, typer.Option(help="Trigger distances r = ||x0 - zeta||.")] = "log:0.001:2:16",
    m_for_r: Annotated[int, typer.Option("--m-for-r", help="Poison count of the r sweep.", min=1)] = 64,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Other kernel-trial fields, FIELD=VALUE (ell, lam, n_clean, dim, jitter...).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Write into a non-empty --out folder.")] = False,
) -> dict[str, Any]:
    """KRR laws numerically vs closed form over m and r: linear-then-saturating efficacy, curvature
    quadratic in efficacy, and the near-clone twilight zone where the spike vanishes but efficacy stays."""
    from analysis.theory import run_theory
    from trainables.exact_models.kernel import KernelConfig

    from ..spaces import parse_sets, parse_values

    base = KernelConfig.from_dict({"kind": "kernel", "lam": 0.1, **parse_sets(set_, "kernel")})
    ms = [int(v) for v in parse_values("m", m, kind="kernel")]
    res = run_theory(base, ms, parse_values("r", r, kind="kernel"), m_for_r, out, overwrite)
    summary = res["summary"]
    for k, v in summary.items():
        typer.echo(f"{k:28} {v:.6g}" if isinstance(v, float) else f"{k:28} {v}")
    typer.echo(f"figures: {', '.join(str(f) for f in res['figures'])}")
    return summary


@app.command()
def ui(
    name: Annotated[
        str | None,
        typer.Argument(
            help="Sweep whose runs table to link \\[default: none, the experiment list].", show_default=False
        ),
    ] = None,
    storage: StorageOpt = "./sweeps",
    mlflow_uri: MlflowOpt = None,
    port: Annotated[int, typer.Option(help="Port of the MLflow UI on 127.0.0.1.", min=1, max=65535)] = 5000,
) -> dict[str, Any]:
    """Browse a sweep in the MLflow UI: starts it on the sweep store and prints the runs table's link (Ctrl-C stops it)."""
    from ..ui import UIStopped, serve_ui

    try:
        return serve_ui(name, storage, mlflow_uri, port, echo=typer.echo)
    except UIStopped as e:  # the server's whole process tree is gone by now
        if e.exit_code == 130:  # Ctrl-C: exit 130 like every command
            raise Interrupted(str(e)) from None
        typer.echo(f"sweeper: {e}", err=True)
        raise typer.Exit(e.exit_code) from None  # 128 + the signal's number: 143 for SIGTERM, 129 for SIGHUP
