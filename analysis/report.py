"""A sweep's one-page report: every figure, the frontier and the paper's tables, as Markdown + HTML.

Written into a folder, whole or not at all, and logged to the sweep's parent MLflow run (``report/``).
Trials that did not complete (diverged, failed, unfinished) are listed with their status, never dropped
silently. Without MLflow the report reads the sweep's Ray folder and the artifacts on this machine.
"""

from __future__ import annotations

import html
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from trainables import trial_kind
from trainables.config import SweeperError
from trainables.record import is_defence_search

from . import detection_plots, frontier_plot, plots
from .artifacts import Artifacts
from .detect import auroc_text
from .detect import detectability_lag as detect_lag
from .frontier import varying_fields
from .pareto import seed_frontier
from .results import (
    completed,
    default_groups,
    load_results,
    parent_run_id,
    sweep_kind,
    sweep_meta,
    unfinished,
)

SHOW = [
    "theta",
    "kappa",
    "augment",
    "epochs",
    "seed",
    "status",
    "clean_acc",
    "asr",
    "overlap_sq",
    "max_overlap_sq",
    "max_overlap_index",
    "lambda_1",
]


def _detection(df: pd.DataFrame) -> tuple[pd.DataFrame | None, str]:
    """The population detection table, or None and the reason (what to add to the sweep)."""
    from .detect import detection_table

    try:
        return detection_table(df), (
            "AUROC of telling poisoned from clean models per θ, 95% bootstrap interval "
            "over models, TPR at 5% FPR; access: what a defender holds to compute the statistic "
            "(compare statistics within a level only); oracle rows need the trigger"
        )
    except SweeperError as e:
        return None, f"not scored: {e}"


def _detection_summary(table: pd.DataFrame) -> pd.DataFrame:
    t = table.copy()
    t["AUROC [95% CI]"] = auroc_text(t, 2)
    keep = [c for c in t.columns if c not in ("auroc", "auroc_lo", "auroc_hi", "clean_acc")]
    return t[keep]


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


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """The absolute output folder; a non-empty one is refused unless ``overwrite`` (nothing is lost)."""
    out = Path(out).expanduser().absolute()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SweeperError(f"--out {out} is not empty; refusing to overwrite (pass --overwrite or another folder)")
    return out


DETECTION_IMAGES = ("nc_triggers.png",)  # the localisation maps are drawn by detection_plots.plot_localisation


def detection_images(df: pd.DataFrame, artifacts: Artifacts, out: Path, limit: int = 8) -> list[Path]:
    """Neural Cleanse's reversed triggers (when that baseline ran) of a few models, copied from their
    runs' artifacts (the embedded store's files, else MLflow): for each defence setting (kappa, augment,
    epochs), the clean model (theta = 0) and the most poisoned one, lowest seed first. Only those models'
    artifacts are fetched; missing ones are skipped."""
    ok = completed(df)
    if ok.empty or "run_id" not in ok.columns or "theta" not in ok.columns:
        return []
    cells = [c for c in ("kappa", "augment", "epochs") if c in ok.columns]
    picked = []
    for _, g in ok.groupby(cells, sort=True) if cells else [((), ok)]:
        g = g.sort_values([c for c in ("seed",) if c in g.columns] or ["theta"])
        for theta in sorted({float(g["theta"].min()), float(g["theta"].max())}):
            picked.append(g[g["theta"] == theta].iloc[0])
    files = []
    for row in picked[:limit]:
        label = plots.file_tag({k: row[k] for k in ["theta", *cells]})  # no '=' in file names
        for art in DETECTION_IMAGES:
            with tempfile.TemporaryDirectory() as tmp:
                src = artifacts.fetch(row["run_id"], art, Path(tmp))
                if src is None:  # no such artifact (detection off, baseline not run) or MLflow unavailable
                    continue
                dst = out / f"{art.removesuffix('.png')}_{label}.png"
                shutil.copyfile(src, dst)
                files.append(dst)
    return files


def _defence_report(models: pd.DataFrame, meta, out: Path) -> tuple[list, list[Path]]:
    """A defence search's sections: the defences scored over the threats, their frontier and its
    per-threat detail; ``defences.csv`` and the defence frontier's figure."""
    from .defence_table import defence_frontier

    res = defence_frontier(models, meta)
    table = res["defences"]
    if table.empty:
        return [("Defences", "no defence has finished yet", None)], []
    table.to_csv(out / "defences.csv", index=False)
    pairs = [(o.metric, o.direction) for o in res["objectives"]]
    what = ", ".join(f"{o.metric} {o.direction} ({o.aggregate} over threats)" for o in res["objectives"])
    threats = "; ".join(" ".join(f"{k}={v}" for k, v in t.items()) or "one threat" for t in meta.search["threats"])
    figures = frontier_plot.plot_frontier(
        table, out, pairs, None, name="defence_frontier", title="defence frontier (objectives aggregated over threats)"
    )
    cols = [
        c
        for c in ["defence_key", *res["defence_fields"]]
        + [c for m, _ in pairs for c in (m, f"{m}_std")]
        + ["n_models", "n_diverged", "n_failed", "status"]
        if c in table.columns
    ]
    return [
        ("Defence frontier", f"{what}; threats: {threats}; seeds: {meta.search['seeds']}", res["frontier"][cols]),
        ("Frontier defences per threat (mean over seeds)", "", res["detail"]),
        ("All defences", "", table[cols]),
    ], figures


def _quiet(line: str) -> None:
    """The default progress sink of :func:`write_report`: a library call prints nothing."""


def _staging(final: Path) -> Path:
    """A new hidden folder beside ``final`` to write the report into (the same filesystem: one rename)."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    except OSError as e:
        raise SweeperError(f"--out {final}: cannot write beside it in {final.parent}: {e.strerror}") from None


def _into_place(tmp: Path, final: Path) -> None:
    """Move the finished report to ``final``: one rename when ``final`` is new or empty; into an existing
    folder (``--overwrite``) file by file, keeping its other files."""
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    if not final.exists():
        os.rename(tmp, final)
        return
    for src in sorted(tmp.iterdir()):
        dst = final / src.name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(src, dst)
    tmp.rmdir()


def write_report(
    name: str,
    out: str | Path,
    storage: str | Path = "./sweeps",
    mlflow_uri: str | None = None,
    overwrite: bool = False,
    log_to_mlflow: bool = True,
    source: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write figures (PNG + SVG), ``summary.md``, ``summary.html`` and ``results.csv`` into ``out``.

    The report is written into a hidden folder beside ``out`` and moved into place once complete, so a
    report that fails or is interrupted part-way leaves no ``out`` (and a rerun starts clean). When MLflow
    does not answer, the results come from the sweep's Ray folder and the artifacts from the embedded
    store's files or the trials' checkpoints, never through MLflow's minutes of retries; ``notes`` says
    where the report read from and what it left out. ``progress`` gets one line per step that can take
    seconds, from the moment the sweep is read (the CLI prints them on stderr).
    """
    say = progress or _quiet
    final = check_out_dir(out, overwrite)
    df = load_results(name, storage, mlflow_uri, source)  # no line before: a bad input stays one line on stderr
    if df.empty:
        raise SweeperError(f"sweep {name!r} has no trials yet")
    read_from = str(df.attrs.get("source", ""))
    meta = sweep_meta(name, storage)
    uri = mlflow_uri or (meta.mlflow_uri if meta else None)
    mlflow_ok = read_from.startswith("mlflow")
    notes = [] if mlflow_ok or read_from == "ray" else [f"read from {read_from}"]
    say(f"report: {len(df)} trials read from {read_from.split(' (')[0]}")
    tmp = _staging(final)
    try:
        res = _compose(name, df, meta, tmp, Artifacts(name, storage, uri, use_mlflow=mlflow_ok, meta=meta), say, notes)
        _into_place(tmp, final)
    except BaseException:  # an error or Ctrl-C part-way: nothing half-written is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    res["figures"] = [final / p.relative_to(tmp) for p in res["figures"]]
    logged = None
    if log_to_mlflow and uri and not mlflow_ok:
        notes.append("not logged to MLflow: the results were read from the Ray folder")
    elif log_to_mlflow and uri:
        from .schema import client

        # sweeper.json knows the parent run of its own store: no second search of the experiment
        run = meta.parent_run_id if meta and meta.parent_run_id and uri == meta.mlflow_uri else parent_run_id(name, uri)
        if run is not None:
            say(f"report: logging the report to MLflow run {run}…")
            try:
                client(uri).log_artifacts(run, str(final), "report")
                logged = run
            except Exception as e:  # the report is complete on disk: a failed upload is a note, not a failure
                notes.append(f"not logged to MLflow run {run}: {str(e).splitlines()[0][:300]}")
    return {**res, "out": final, "mlflow_parent_run": logged, "notes": notes}


def _compose(
    name: str, df: pd.DataFrame, meta, out: Path, arts: Artifacts, say: Callable[[str], None], notes: list[str]
) -> dict[str, Any]:
    """Every figure, table and file of :func:`write_report`, into the folder ``out``."""
    kind = trial_kind(sweep_kind(df))
    objectives = list(kind.objectives)
    ok = completed(df)
    figures: list[Path] = []
    say("report: figures of the metrics against θ…")
    if kind.name == "kernel":  # the KRR laws: efficacy and curvature against the poison count
        figures += plots.plot_metric_vs(df, out, "m", ["delta_f", "spike", "lambda_max"], "r", "kernel_vs_m", logx=True)
    figures += plots.plot_asr_vs_theta(df, out)
    figures += plots.plot_overlap_vs_theta(df, out)
    say("report: eigenvector images…")
    figures += plots.plot_eigenvector_grid(df, arts.eigenvectors, out)
    group = default_groups(df) or None
    if all(m in ok.columns for m, _ in objectives) and not ok.empty:
        figures += frontier_plot.plot_frontier(df, out, objectives, group)
        front = seed_frontier(ok, objectives, group, metrics=kind.columns)  # seeds averaged when a sweep has them
    else:
        front = ok.iloc[:0]
    lag = plots.detectability_lag(df)
    if not lag.empty:
        figures += plots.plot_lag(lag, out)
    say(f"report: detection over {len(ok)} completed models…")
    detection, detect_note = _detection(df)
    if detection is not None:
        figures += detection_plots.plot_detection(detection, df, out, panel_by="access")  # levels kept apart
    say("report: localisation maps and reversed triggers…")
    images = detection_plots.plot_localisation(df, arts.eigenvectors, out)
    images += detection_images(df, arts, out)
    figures += images
    defence_sections = []
    if is_defence_search(meta):
        defence_sections, more = _defence_report(df, meta, out)
        figures += more
    if arts.skipped:
        notes.append(
            f"{arts.skipped} artifact(s) neither on this machine nor fetched from MLflow ({arts.why}): "
            "the eigenvector and localisation figures leave those models out"
        )
    say("report: writing results.csv, summary.md, summary.html…")
    problems = unfinished(df)
    df.to_csv(out / "results.csv", index=False)
    counts = df["status"].value_counts().to_dict()
    shown = list(dict.fromkeys(varying_fields(df, meta) + [c for c in SHOW if c in df.columns] + list(kind.columns)))
    shown = [c for c in shown if c in df.columns]
    what = ", ".join(f"{'maximize' if d == 'max' else 'minimize'} {m}" for m, d in objectives)
    sections = [
        *([("Notes", "; ".join(notes), None)] if notes else []),
        *defence_sections,
        ("Trials", f"{len(df)} trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), None),
        (
            "Safety–efficacy frontier" + (f" (per {', '.join(group)})" if group else ""),
            what,
            front[[c for c in [*shown, "n_seeds", *(f"{m}_std" for m, _ in objectives)] if c in front.columns]],
        ),
        ("Table 1: accuracy / ASR (%) per epochs × κ at the largest θ", "", plots.table1(df)),
        (
            "Table 2: max overlap² with the trigger and its eigenvector index",
            "with seeds: mean overlap² (and its std), the index most seeds share (ties: the lowest) and how many do",
            plots.table2(df),
        ),
        (
            "Detection over model populations",
            detect_note,
            _detection_summary(detection) if detection is not None else None,
        ),
        (
            "Detectability lag (populations)",
            "per statistic: the smallest θ with mean ASR ≥ 0.5 against the "
            "smallest θ whose AUROC lower 95% bound ≥ 0.9",
            detect_lag(detection) if detection is not None else None,
        ),
        (
            "Localisation maps and reversed triggers",
            "per defence setting, the clean model (θ = 0) and the most "
            "poisoned one: the energy of each top eigenvector per pixel (a patch trigger concentrates it), and Neural "
            "Cleanse's reversed trigger per class when that baseline ran: "
            + ", ".join(p.name for p in images if p.suffix == ".png")
            if images
            else "",
            None,
        ),
        (
            "Detectability lag (single clean model, kept for comparison)",
            "θ for ASR ≥ 0.5 vs θ for overlap² > clean mean + 3σ; with one clean model σ = 0, so this is no statistic",
            lag,
        ),
        (
            "Not completed (diverged / failed / interrupted / pending)",
            "",
            problems[[c for c in shown + ["error"] if c in problems.columns]] if not problems.empty else problems,
        ),
        ("All trials", "", df[shown]),
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
        "<!doctype html><html><head><meta charset='utf-8'><title>sweep "
        + html.escape(name)
        + "</title><style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
        "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )
    return {"figures": figures, "frontier": front, "problems": problems, "counts": counts}
