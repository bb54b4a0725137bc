"""A defence judged against a threat: the threat fields, objectives aggregated over threats, and
the table of defences a defender's frontier is drawn on.

A *threat* is what the attacker chooses (poison fraction, trigger, poisoning mode and the
trigger's own parameters); a *defence* is everything else the trainer sets (κ, augmentation,
epochs, learning rate, ...). ``sweeper search`` evaluates each defence against every threat of a
fixed set, with ``n`` seeds each, and scores it by aggregating the models' metrics:

1. per threat, the mean over seeds (the seeds' standard deviation is kept as ``<metric>_std``);
2. over threats, ``worst`` (the minimum of a metric to maximise, the maximum of one to minimise)
   or ``mean``.

By default clean accuracy is averaged over threats and ASR taken at its worst: the defender keeps
the accuracy it keeps on average and must stop every attack. A defence with any diverged or failed
model has no objectives (NaN; status ``diverged`` or ``failed``): it is never a good defence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from trainables.config import SweeperError
from trainables.record import DEFENCE_KEY, Objective, parse_objectives, stored_objectives


def aggregate_models(
    models: pd.DataFrame, objectives: Sequence[Objective], threat_fields: Sequence[str], expected: int | None = None
) -> tuple[dict[str, Any], pd.DataFrame]:
    """One defence's objectives from its models' rows, and its per-threat detail.

    ``models`` has one row per (threat, seed) model with a ``status`` column and the objective
    metrics; ``threat_fields`` names the columns that tell threats apart; ``expected`` is the number
    of models the defence owes (threats x seeds). Returns ``({metric: value, metric_std: seed std,
    n_models, n_diverged, n_failed, status}, per_threat)``. Only a defence whose every owed model
    completed has objectives; otherwise they are NaN and the status says why: ``diverged`` before
    ``failed`` before a model's own unfinished status (running, interrupted) before ``pending``
    (models not started yet).
    """
    metrics = [o.metric for o in objectives]
    status = models["status"] if "status" in models.columns else pd.Series("completed", index=models.index)
    counts = {
        "n_models": int(len(models)),
        "n_diverged": int((status == "diverged").sum()),
        "n_failed": int((status == "failed").sum()),
    }
    by = [f for f in threat_fields if f in models.columns]
    ok = models[status == "completed"]
    missing = [m for m in metrics if m not in ok.columns] if not ok.empty else []
    if missing:
        raise SweeperError(
            f"--objectives: metric(s) {missing} not in the models' results; available: "
            f"{sorted(c for c in ok.columns if ok[c].dtype.kind == 'f')}"
        )
    out: dict[str, Any] = dict(counts)
    unfinished = [s for s in status if s not in ("completed", "diverged", "failed")]
    owed = expected if expected is not None else len(models)
    if counts["n_diverged"] or counts["n_failed"] or unfinished or len(ok) < owed or ok.empty:
        out["status"] = (
            "diverged"
            if counts["n_diverged"]
            else "failed"
            if counts["n_failed"]
            else unfinished[0]
            if unfinished
            else "pending"
        )
        for m in metrics:
            out[m], out[f"{m}_std"] = float("nan"), float("nan")
        return out, _per_threat(ok, by, [m for m in metrics if m in ok.columns])
    per = _per_threat(ok, by, metrics)
    out["status"] = "completed"
    for o in objectives:
        vals = per[o.metric].to_numpy(dtype=float)
        stds = per[f"{o.metric}_std"].to_numpy(dtype=float)
        if o.aggregate == "mean":
            out[o.metric] = float(np.mean(vals))
            out[f"{o.metric}_std"] = float(np.nanmean(stds)) if np.isfinite(stds).any() else float("nan")
        else:
            i = int(np.argmin(vals) if o.direction == "max" else np.argmax(vals))
            out[o.metric], out[f"{o.metric}_std"] = float(vals[i]), float(stds[i])
    return out, per


def _per_threat(ok: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean and seed std of ``metrics`` per threat (one row per combination of ``by``)."""
    if ok.empty or not metrics:
        return pd.DataFrame(columns=[*by, *metrics, "n_seeds"])
    grouped = ok.groupby(by, dropna=False, sort=True) if by else ok.groupby(lambda _: 0)
    per = grouped[metrics].agg(["mean", "std"])
    per.columns = [m if s == "mean" else f"{m}_std" for m, s in per.columns]
    per["n_seeds"] = grouped.size()
    return per.reset_index(drop=not by)


def defence_table(
    models: pd.DataFrame,
    objectives: Sequence[Objective],
    threat_fields: Sequence[str],
    defence_fields: Sequence[str],
    expected: int | None = None,
) -> pd.DataFrame:
    """One row per defence (``defence_key``): its fields, aggregated objectives, counts and status
    (``expected``: models each defence owes; fewer rows mean some have not started)."""
    if models.empty or DEFENCE_KEY not in models.columns:
        return pd.DataFrame()
    rows = []
    for key, g in models.groupby(DEFENCE_KEY, sort=False):
        agg, _ = aggregate_models(g, objectives, threat_fields, expected)
        first = g.iloc[0]
        rows.append({DEFENCE_KEY: key, **{f: first[f] for f in defence_fields if f in g.columns}, **agg})
    return pd.DataFrame(rows)


def search_meta_objectives(meta, objectives: str | None, aggregate: str | None) -> list[Objective]:
    """The objectives to draw a search's frontier on: the search's own unless overridden; a metric
    given without an aggregation keeps the one the search used for it."""
    stored = stored_objectives(meta.search)
    searched = {o.metric: o.aggregate for o in stored}
    if objectives is None and aggregate is None:
        return stored
    if objectives is None:
        objectives = ",".join(f"{o.metric}:{o.direction}" for o in stored)
    if aggregate is None:
        objectives = ",".join(
            p
            if p.count(":") >= 2 or p.split(":")[0].strip() not in searched
            else f"{p}:{searched[p.split(':')[0].strip()]}"
            for p in objectives.split(",")
        )
    return parse_objectives(objectives, aggregate)


def defence_frontier(
    models: pd.DataFrame, meta, objectives: str | None = None, aggregate: str | None = None
) -> dict[str, Any]:
    """A defence search's frontier: the defences table, the frontier over defences, and each frontier
    defence's per-threat detail (means over seeds)."""
    from .pareto import frontier

    objs = search_meta_objectives(meta, objectives, aggregate)
    threat_fields = list(meta.search.get("threat_fields", []))
    defence_fields = list(meta.spec.get("axes", {}))
    has = models[models[DEFENCE_KEY].notna()] if DEFENCE_KEY in models.columns else models.iloc[:0]
    expected = len(meta.search["threats"]) * len(meta.search["seeds"])
    table = defence_table(has, objs, threat_fields, defence_fields, expected)
    pairs = [(o.metric, o.direction) for o in objs]
    ok = table[table["status"] == "completed"] if not table.empty else table
    front = frontier(ok, pairs) if not ok.empty else ok
    detail = pd.DataFrame()
    if not front.empty:
        parts = []
        for key in front[DEFENCE_KEY]:
            _, per = aggregate_models(has[has[DEFENCE_KEY] == key], objs, threat_fields, expected)
            parts.append(per.assign(**{DEFENCE_KEY: key}))
        detail = pd.concat(parts, ignore_index=True)
        detail = detail[[DEFENCE_KEY] + [c for c in detail.columns if c != DEFENCE_KEY]]
    return {
        "defences": table,
        "frontier": front,
        "objectives": objs,
        "detail": detail,
        "defence_fields": defence_fields,
        "threat_fields": threat_fields,
    }
