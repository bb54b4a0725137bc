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

from . import detection_plots, frontier_plot, plots
from .defence import is_defence_search
from .detect import auroc_text
from .detect import detectability_lag as detect_lag
from .pareto import seed_frontier
from .results import (
    Artifacts,
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


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _detection(df: pd.DataFrame) -> tuple[pd.DataFrame | None, str]:
    """The population detection table, or None and the reason (what to add to the sweep)."""
    from .detect import detection_table

    try:
        return detection_table(df), (
            "AUROC of telling poisoned from clean models per θ, 95% bootstrap interval "
            "over models, TPR at 5% FPR; oracle rows need the trigger"
        )
    except SweeperError as e:
        return None, f"not scored: {e}"


def _detection_summary(table: pd.DataFrame) -> pd.DataFrame:
    t = table.copy()
    t["AUROC [95% CI]"] = auroc_text(t, 2)
    keep = [c for c in t.columns if c not in ("auroc", "auroc_lo", "auroc_hi", "clean_acc")]
    return t[keep]


def sweep_summary(
    rows: list[dict[str, Any]] | pd.DataFrame,
    varying: list[str],
    groups: list[str] | None = None,
    objectives: list[tuple[str, str]] | None = None,
) -> str:
    """The text a sweep run or resume prints: every trial, the frontier, the trials not on it.

    Columns and objectives come from the trial kind's registry entry (network, kernel, linear);
    ``groups`` None draws one frontier per attack field that varies.
    """
    df = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows
    if df.empty:
        return "no trials"
    kind = trial_kind(sweep_kind(df))
    keys = [c for c in varying if c in df.columns]
    objectives = list(objectives or kind.objectives)
    extra = [c for m, _ in objectives for c in (m, f"{m}_std") if c in df.columns]
    cols = list(dict.fromkeys(keys + ["status"] + extra + [c for c in kind.columns if c in df.columns]))
    out = [df[cols].sort_values(keys or cols[:1], kind="stable").to_string(index=False, float_format=_fmt)]
    ok = completed(df)
    if not ok.empty and all(m in ok.columns for m, _ in objectives):
        groups = default_groups(df) if groups is None else [g for g in groups if g in ok.columns]
        # seeds of one configuration are averaged first (mean, std, n_seeds): a frontier of seed noise says nothing
        front = seed_frontier(ok, objectives, groups or None, metrics=[c for c in cols if c in kind.columns])
        what = ", ".join(f"{'maximize' if d == 'max' else 'minimize'} {m}" for m, d in objectives)
        out.append(f"\nfrontier ({what}" + (f"; per {', '.join(groups)}" if groups else "") + "):")
        stats = ["n_seeds", *(f"{m}_std" for m, _ in objectives)]
        shown = [c for c in dict.fromkeys(cols + stats) if c in front.columns]
        out.append(front[shown].to_string(index=False, float_format=_fmt))
    bad = unfinished(df)
    if not bad.empty:
        out.append("\nnot on any frontier (diverged / failed / interrupted / pending):")
        shown = cols + (["error"] if "error" in bad.columns and bad["error"].fillna("").astype(bool).any() else [])
        out.append(bad[shown].to_string(index=False, float_format=_fmt))
    return "\n".join(out)


def varying_fields(df: pd.DataFrame, meta=None) -> list[str]:
    """The config fields that tell the trials apart: the sweep's axes first, then any other that varies."""
    from .results import CONFIG_FIELDS

    axes = list((meta.spec if meta else {}).get("axes", {}))
    others = [c for c in CONFIG_FIELDS if c in df.columns and c not in axes and df[c].nunique(dropna=True) > 1]
    return [c for c in axes if c in df.columns] + others


def sweep_frontier(
    name: str,
    storage: str | Path = "./sweeps",
    mlflow_uri: str | None = None,
    source: str = "auto",
    objectives: str | None = None,
    group_by: str | None = None,
    aggregate: bool | None = None,
    threats: str | None = None,
) -> dict[str, Any]:
    """A sweep's frontier: its rows loaded, seeds averaged (``aggregate`` None: when a configuration
    ran with several seeds; False: one point per seed), one frontier per group.

    A defence search's frontier is drawn over its defences, each scored over the threats (``threats``
    worst | mean overrides the search's aggregation); ``detail`` then holds the frontier defences'
    per-threat values.

    ``objectives`` as ``clean_acc:max,asr:min`` (default: the trial kind's); ``group_by`` a comma
    list of columns, ``none`` for one global frontier, or None for the attack fields that vary.
    Returns the frontier, the objectives and groups used, the completed count and the unfinished rows.
    """
    from .pareto import parse_objectives

    df = load_results(name, storage, mlflow_uri, source)
    if df.empty:
        raise SweeperError(f"sweep {name!r} has no trials yet")
    meta = sweep_meta(name, storage)
    if is_defence_search(meta):
        from .defence import defence_frontier

        if group_by not in (None, "none") or aggregate:
            raise SweeperError(
                "a defence search's frontier is over defences (seeds are always averaged, threats "
                "aggregated): --group-by and --aggregate-seeds do not apply; use --threats worst|mean"
            )
        res = defence_frontier(df, meta, objectives, threats)
        table = res["defences"]
        return {
            "frontier": res["frontier"],
            "objectives": [(o.metric, o.direction) for o in res["objectives"]],
            "groups": [],
            "n_completed": int((table["status"] == "completed").sum()) if not table.empty else 0,
            "unfinished": table[table["status"] != "completed"] if not table.empty else table,
            "varying": res["defence_fields"],
            "source": df.attrs.get("source", ""),
            "detail": res["detail"],
            "defences": table,
            "aggregation": res["objectives"],
            "threat_fields": res["threat_fields"],
        }
    if threats is not None:
        raise SweeperError(f"--threats applies to a defence search (sweeper search); {name!r} is a grid")
    kind = trial_kind(sweep_kind(df))
    try:
        objs = parse_objectives(objectives) if objectives else list(kind.objectives)
    except ValueError as e:
        raise SweeperError(f"--objectives: {e}") from None
    metrics = [m for m, _ in objs]
    if completed(df).empty:  # before the objectives are blamed: there is nothing to draw a frontier from
        counts = ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items()) if "status" in df else ""
        raise SweeperError(
            f"sweep {name!r} has no completed trial ({counts}): the frontier needs at least one; "
            f"`sweeper status {name}` and `sweeper report {name}` list the others"
        )
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        raise SweeperError(
            f"--objectives: metric(s) {missing} not in the results; available: "
            f"{sorted(c for c in df.columns if df[c].dtype.kind == 'f')}"
        )
    ok = completed(df)
    if group_by is None:
        groups = default_groups(df)
    elif group_by.strip().lower() == "none":
        groups = []
    else:
        groups = [g.strip() for g in group_by.split(",") if g.strip()]
    bad = [g for g in groups if g not in df.columns]
    if bad:
        raise SweeperError(
            f"--group-by: column(s) {bad} not in the results; available: none, {', '.join(sorted(df.columns))}"
        )
    varying = varying_fields(df, sweep_meta(name, storage))
    return {
        "frontier": seed_frontier(ok, objs, groups or None, aggregate),
        "objectives": objs,
        "groups": groups,
        "n_completed": len(completed(df)),
        "unfinished": unfinished(df),
        "varying": varying,
        "source": df.attrs.get("source", ""),
    }


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
    from .defence import defence_frontier

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
        figures += detection_plots.plot_detection(detection, df, out)
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
