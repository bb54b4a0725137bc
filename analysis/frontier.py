"""A sweep's frontier and run summary as the CLI prints them.

``sweep_frontier`` loads a sweep's rows and draws its frontier (seeds averaged, one frontier per
attack group; over defences for a defence search): ``sweeper frontier``. ``sweep_summary`` is the
text ``sweeper run`` and ``resume`` print: every trial, the frontier, the trials not on it.
``varying_fields`` names the config fields that tell trials apart (the report's columns too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from trainables import trial_kind
from trainables.config import SweeperError
from trainables.record import is_defence_search

from .pareto import seed_frontier
from .results import completed, default_groups, load_results, sweep_kind, sweep_meta, unfinished


def _fmt(v: float) -> str:
    return f"{v:.4g}"


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
    family = ["defence_family"] if "defence_family" in df.columns and df["defence_family"].nunique() > 1 else []
    return family + [c for c in axes if c in df.columns] + others


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
    from trainables.record import parse_objectives

    df = load_results(name, storage, mlflow_uri, source)
    if df.empty:
        raise SweeperError(f"sweep {name!r} has no trials yet")
    meta = sweep_meta(name, storage)
    if is_defence_search(meta):
        from .defence_table import defence_frontier

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
        objs = (
            [(o.metric, o.direction) for o in parse_objectives(objectives, search=False)]
            if objectives
            else list(kind.objectives)
        )
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
    from .families import family_table

    return {
        "families": family_table(df) if "defence_family" in df.columns else None,
        "frontier": seed_frontier(ok, objs, groups or None, aggregate),
        "objectives": objs,
        "groups": groups,
        "n_completed": len(completed(df)),
        "unfinished": unfinished(df),
        "varying": varying,
        "source": df.attrs.get("source", ""),
    }
