"""A sweep's one-page report: every figure, the frontier and the paper's tables, as Markdown + HTML.

Written into a folder and logged to the sweep's parent MLflow run (``report/``). Trials that did
not complete (diverged, failed, unfinished) are listed with their status, never dropped silently.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import pandas as pd

from trainables.config import SweeperError

from . import plots
from .pareto import DEFAULT_OBJECTIVES, frontier
from .results import completed, default_groups, load_eigenvectors, load_results, parent_run_id, sweep_meta, unfinished

SHOW = ["theta", "kappa", "augment", "epochs", "seed", "status", "clean_acc", "asr", "overlap_sq", "max_overlap_sq",
        "max_overlap_index", "lambda_1"]


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    if df.empty:
        return "_(none)_\n"

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _cols(df: pd.DataFrame) -> list[str]:
    return [c for c in SHOW if c in df.columns]


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """The absolute output folder; a non-empty one is refused unless ``overwrite`` (nothing is lost)."""
    out = Path(out).expanduser().absolute()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SweeperError(f"--out {out} is not empty; refusing to overwrite (pass --overwrite or another folder)")
    return out


def write_report(name: str, out: str | Path, storage: str | Path = "./sweeps", mlflow_uri: str | None = None,
                 overwrite: bool = False, log_to_mlflow: bool = True, source: str = "auto") -> dict[str, Any]:
    """Write figures (PNG + SVG), ``summary.md``, ``summary.html`` and ``results.csv`` into ``out``."""
    out = check_out_dir(out, overwrite)
    df = load_results(name, storage, mlflow_uri, source)
    if df.empty:
        raise SweeperError(f"sweep {name!r} has no trials yet")
    out.mkdir(parents=True, exist_ok=True)
    uri = mlflow_uri or (sweep_meta(name, storage) or {}).get("mlflow_uri")
    ok = completed(df)
    figures: list[Path] = []
    figures += plots.plot_asr_vs_theta(df, out)
    figures += plots.plot_overlap_vs_theta(df, out)
    figures += plots.plot_eigenvector_grid(df, lambda row: load_eigenvectors(row, storage, uri), out)
    group = default_groups(df) or None
    figures += plots.plot_frontier(df, out, DEFAULT_OBJECTIVES, group)
    lag = plots.detectability_lag(df)
    if not lag.empty:
        figures += plots.plot_lag(lag, out)
    front = frontier(ok, DEFAULT_OBJECTIVES, group)
    problems = unfinished(df)
    df.to_csv(out / "results.csv", index=False)
    counts = df["status"].value_counts().to_dict()
    sections = [
        ("Trials", f"{len(df)} trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), None),
        ("Safety–efficacy frontier" + (" (per θ)" if group else ""), "maximize clean_acc, minimize asr", front[_cols(front)]),
        ("Table 1: accuracy / ASR (%) per epochs × κ at the largest θ", "", plots.table1(df)),
        ("Table 2: max overlap² with the trigger and its eigenvector index", "", plots.table2(df)),
        ("Detectability lag", "θ for ASR ≥ 0.5 vs θ for overlap² > clean mean + 3σ", lag),
        ("Not completed (diverged / failed / unfinished)", "", problems[_cols(problems) + ["error"]] if not problems.empty else problems),
        ("All trials", "", df[_cols(df)]),
    ]
    pngs = [p for p in figures if p.suffix == ".png"]
    md = [f"# Sweep `{name}`\n"]
    for title, text, table in sections:
        md.append(f"## {title}\n")
        if text:
            md.append(text + "\n")
        if table is not None:
            md.append(markdown_table(table))
    md.append("## Figures\n")
    md += [f"![{p.stem}]({p.name})\n" for p in pngs]
    (out / "summary.md").write_text("\n".join(md))
    body = [f"<h1>Sweep {html.escape(name)}</h1>"]
    for title, text, table in sections:
        body.append(f"<h2>{html.escape(title)}</h2>")
        if text:
            body.append(f"<p>{html.escape(text)}</p>")
        if table is not None:
            body.append(table.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep=""))
    body.append("<h2>Figures</h2>")
    body += [f'<figure><img src="{p.name}" alt="{p.stem}"><figcaption>{p.stem}</figcaption></figure>' for p in pngs]
    (out / "summary.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>sweep " + html.escape(name) +
        "</title><style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
        "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style></head><body>"
        + "\n".join(body) + "</body></html>")
    logged = None
    if log_to_mlflow and uri:
        from mlflow.tracking import MlflowClient

        run = parent_run_id(name, uri)
        if run is not None:
            MlflowClient(uri).log_artifacts(run, str(out), "report")
            logged = run
    return {"out": out, "figures": figures, "frontier": front, "problems": problems, "mlflow_parent_run": logged,
            "counts": counts}
