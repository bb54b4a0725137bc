"""Detection scored like the field scores it: AUROC over populations of models.

A detection statistic is judged over many models, as in the Trojan Detection Challenge (NeurIPS
2022) and TrojAI: for every cell of defence settings (kappa, augmentation, epochs, model, dataset,
trigger... every config field that varies except theta and the seed), the poisoned models at one
theta > 0 against the clean models (theta = 0) of the same cell:

* **AUROC** (the Mann-Whitney statistic, scikit-learn's ``roc_auc_score``) with a **bootstrap 95%
  interval** over models (resampled with replacement within the poisoned and the clean group, seeded,
  percentile interval);
* **TPR at 5% FPR** (the largest true-positive rate of the full ROC curve whose false-positive rate is
  at most 0.05).

Both are rank arithmetic on arrays (:mod:`analysis.roc`, checked against scikit-learn to 1e-12).

Directions are fixed in advance, never chosen per cell to maximise the AUROC: every statistic is
oriented so that higher means more suspicious by the registry of the trial code
(:func:`trainables.detection.statistics.score_direction`); the known-trigger overlap (``max_overlap_sq``,
``overlap_sq``) is included as an **oracle** row, marked as such (a defender cannot compute it).

Every row carries its **access level** (``access``: data-free, clean-data, training-set or oracle), what a
defender must hold to compute the statistic, from the registry entry that declares it
(:func:`trainables.detection.statistics.statistic_access`); a statistic read off the input-Hessian
spectrum takes the level of the spectrum's data (``hessian_split``; ``auto`` is the poisoned training set
as trained under deterministic poisoning). Statistics are compared only within a level.

The **detectability lag** per cell: the smallest theta whose mean ASR >= 0.5 against, per
statistic, the smallest theta whose AUROC's lower bound >= 0.9.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from trainables.config import SweeperError, spectrum_split
from trainables.detection.context import LEVELS
from trainables.detection.statistics import ORACLES as STATISTIC_ORACLES

from .results import CONFIG_FIELDS, completed
from .roc import auroc_with_ci, roc_curve, tpr_at_fpr

ORACLES = tuple(STATISTIC_ORACLES)  # need the trigger: upper references, not detectors
NOT_DEFENCE = {"theta", "seed", "data_dir", "download", "verify_checksums", "device", "threads", "kind", "eval_every"}


TABLE_COLUMNS = (
    "theta",
    "statistic",
    "access",
    "oracle",
    "n_poisoned",
    "n_clean",
    "auroc",
    "auroc_lo",
    "auroc_hi",
    "tpr_at_5fpr",
    "asr",
    "clean_acc",
)  # what detection_table adds beside the cell's fields


def cell_fields(table: pd.DataFrame) -> list[str]:
    """The defence-setting columns of a :func:`detection_table` (one cell per combination)."""
    return [c for c in table.columns if c not in TABLE_COLUMNS]


def auroc_text(table: pd.DataFrame, digits: int = 3) -> list[str]:
    """``AUROC [lo, hi]`` per row of a :func:`detection_table`, for printed and Markdown tables."""
    return [
        f"{a:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
        for a, lo, hi in zip(table["auroc"], table["auroc_lo"], table["auroc_hi"], strict=True)
    ]


def detection_statistics(df: pd.DataFrame) -> list[str]:
    """Score columns present in ``df`` (registry direction "higher"), then the oracles."""
    from trainables.detection.statistics import score_direction

    scores = [c for c in df.columns if c not in ORACLES and score_direction(c) == "higher" and df[c].notna().any()]
    return sorted(scores) + [o for o in ORACLES if o in df.columns and df[o].notna().any()]


def defence_fields(df: pd.DataFrame) -> list[str]:
    """The config fields that vary among the trials, theta and the seed excepted: a cell is one combination."""
    return [
        c
        for c in CONFIG_FIELDS
        if c in df.columns
        and c not in NOT_DEFENCE
        and df[c].map(lambda v: v if isinstance(v, int | float | str | bool) else str(v)).nunique(dropna=False) > 1
    ]


def check_population(df: pd.DataFrame) -> None:
    """A sweep that cannot be scored gets a message saying what to add, not an empty table."""
    ok = completed(df)
    if ok.empty or "theta" not in ok.columns:
        raise SweeperError("no completed network trials to score; run a sweep with --theta 0,... --seeds N first")
    if not (ok["theta"] == 0).any():
        raise SweeperError("detection needs clean models: add theta 0 to the grid (e.g. --theta 0,0.05,0.1)")
    if not (ok["theta"] > 0).any():
        raise SweeperError("detection needs poisoned models: add a theta > 0 (e.g. --theta 0,0.05,0.1)")
    if "seed" not in ok.columns or ok["seed"].nunique() < 2:
        raise SweeperError("detection is scored over populations of models: add seeds (e.g. --seeds 10)")
    if not detection_statistics(ok):
        raise SweeperError(
            "the trials carry no detection statistic: run them with --detect (the default) "
            "or --detect-baselines nc,ss,ac"
        )


def check_statistics(ok: pd.DataFrame, statistics: Sequence[str] | None) -> list[str]:
    """The statistics to score among the completed trials ``ok``: those asked for (each must be a column),
    else every detection score present, then the oracles."""
    stats = list(statistics) if statistics else detection_statistics(ok)
    missing = [s for s in stats if s not in ok.columns]
    if missing:
        raise SweeperError(f"--statistics: {missing} not in the results; available: {detection_statistics(ok)}")
    return stats


def cell_split(cell: pd.DataFrame) -> str:
    """The data a cell's spectra averaged (``hessian_split`` resolved; the defaults where a record lacks them)."""
    first = cell.iloc[0]
    hs = first.get("hessian_split", "auto")
    pm = first.get("poison_mode", "deterministic")
    return spectrum_split(hs if isinstance(hs, str) else "auto", pm if isinstance(pm, str) else "deterministic")


def statistic_level(statistic: str, split: str) -> str:
    """The access level of ``statistic`` in a cell whose spectrum averaged ``split``; a column no registry
    entry declares (asked for by ``--statistics``) is ``unknown``."""
    from trainables.detection.statistics import statistic_access

    return statistic_access(statistic, split) or "unknown"


def level_order(level: str) -> int:
    """Sort key of an access level: least held first, unknown last."""
    return LEVELS.index(level) if level in LEVELS else len(LEVELS)


def detection_table(
    df: pd.DataFrame, statistics: Sequence[str] | None = None, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """One row per (cell, theta > 0, statistic): access, n_poisoned, n_clean, auroc, auroc_lo, auroc_hi,
    tpr_at_5fpr, oracle, and the cell's mean ASR and clean accuracy at that theta."""
    check_population(df)
    ok = completed(df)
    stats = check_statistics(ok, statistics)
    cells = defence_fields(ok)
    rows: list[dict[str, Any]] = []
    groups = ok.groupby(cells, dropna=False, sort=True) if cells else [((), ok)]
    for key, cell in groups:
        key = key if isinstance(key, tuple) else (key,)
        clean = cell[cell["theta"] == 0]
        if clean.empty:
            continue
        split = cell_split(cell)
        for theta, pois in cell[cell["theta"] > 0].groupby("theta", sort=True):
            for s in stats:
                auc, lo, hi = auroc_with_ci(pois[s].to_numpy(), clean[s].to_numpy(), n_boot, seed)
                rows.append(
                    {
                        **dict(zip(cells, key, strict=True)),
                        "theta": theta,
                        "statistic": s,
                        "access": statistic_level(s, split),
                        "oracle": s in ORACLES,
                        "n_poisoned": int(pois[s].notna().sum()),
                        "n_clean": int(clean[s].notna().sum()),
                        "auroc": auc,
                        "auroc_lo": lo,
                        "auroc_hi": hi,
                        "tpr_at_5fpr": tpr_at_fpr(pois[s].to_numpy(), clean[s].to_numpy()),
                        "asr": float(pois["asr"].mean()) if "asr" in pois else math.nan,
                        "clean_acc": float(pois["clean_acc"].mean()) if "clean_acc" in pois else math.nan,
                    }
                )
    if not rows:
        raise SweeperError(
            "no cell of defence settings has both clean (theta 0) and poisoned models; "
            "give every setting a theta 0 (e.g. --theta 0,0.05,0.1)"
        )
    return pd.DataFrame(rows)


def data_level_auroc(df: pd.DataFrame) -> pd.DataFrame:
    """The data-level baselines' per-sample AUROC of finding the poisoned training samples, over
    the poisoned models of each cell of defence settings and theta: mean, std and count of the per-model
    values (``ss_auroc``, ``ac_auroc``...; training-set access)."""
    ok = completed(df)
    cols = [c for c in ok.columns if c.endswith("_auroc") and ok[c].notna().any()]
    if not cols or "theta" not in ok.columns:
        return pd.DataFrame()
    pois = ok[ok["theta"] > 0]
    keys = defence_fields(ok) + ["theta"]  # per cell of defence settings, as the model-level table
    out = pois.groupby(keys, dropna=False)[cols].agg(["mean", "std", "count"])
    out.columns = [f"{c}_{s}" for c, s in out.columns]
    return out.reset_index()


def detectability_lag(table: pd.DataFrame, asr_level: float = 0.5, auroc_floor: float = 0.9) -> pd.DataFrame:
    """Per cell and statistic: the smallest theta whose mean ASR >= ``asr_level`` (theta_asr), the
    smallest theta whose AUROC lower bound >= ``auroc_floor`` (theta_detect), and the lag between
    them (NaN where a level is never reached)."""
    cells = cell_fields(table)
    rows = []
    for key, g in table.groupby(cells + ["statistic"], dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        g = g.sort_values("theta")
        hit = g.loc[g["asr"] >= asr_level, "theta"]
        det = g.loc[g["auroc_lo"] >= auroc_floor, "theta"]
        t_asr = float(hit.iloc[0]) if len(hit) else math.nan
        t_det = float(det.iloc[0]) if len(det) else math.nan
        rows.append(
            {
                **dict(zip(cells + ["statistic"], key, strict=True)),
                "access": g["access"].iloc[0] if "access" in g else "unknown",
                "oracle": bool(g["oracle"].iloc[0]),
                "theta_asr": t_asr,
                "theta_detect": t_det,
                "lag": t_det - t_asr,
            }
        )
    return pd.DataFrame(rows)


def roc_points(
    df: pd.DataFrame, statistic: str, theta: float, cell: dict[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of one statistic at one theta against the clean models of the same cell."""
    ok = completed(df)
    for k, v in (cell or {}).items():
        ok = ok[ok[k] == v]
    p = ok.loc[np.isclose(ok["theta"], theta), statistic].dropna().to_numpy()
    c = ok.loc[ok["theta"] == 0, statistic].dropna().to_numpy()
    if len(p) == 0 or len(c) == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    return roc_curve(p, c)


LEVEL_TEXT = {
    "data-free": "the weights only",
    "clean-data": "the weights and a few clean held-out images",
    "training-set": "the training set as trained, poisons included (unlabelled as such)",
    "oracle": "the trigger: upper references, no detector",
    "unknown": "no registry entry declares these columns",
}


def level_tables(table: pd.DataFrame) -> list[str]:
    """The printed tables of a :func:`detection_table`, one per access level (least held first), rows
    ranked by AUROC within each (cell, theta)."""
    cells = cell_fields(table)
    shown = table.assign(**{"AUROC [95% CI]": auroc_text(table, 3)})
    cols = cells + ["theta", "statistic", "n_poisoned", "n_clean", "AUROC [95% CI]", "tpr_at_5fpr", "asr"]
    out = []
    for level in sorted(shown["access"].unique(), key=level_order):
        part = shown[shown["access"] == level].sort_values(
            cells + ["theta", "auroc"], ascending=[True] * (len(cells) + 1) + [False], na_position="last"
        )
        out += [
            f"\n[{level}] {LEVEL_TEXT.get(level, '')}:",
            part[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"),
        ]
    return out


def detect_sweep(
    name: str,
    storage: str = "./sweeps",
    mlflow_uri: str | None = None,
    source: str = "auto",
    statistics: str | None = None,
    n_boot: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``sweeper detect``: load a sweep, score it, and format the table and the lag as text.

    ``progress`` gets a line before the scoring, once the sweep is read and can be scored (a bad input
    stays one line); ``source`` in the result says where the trials were read from (the Ray folder when
    MLflow did not answer).
    """
    from .results import load_results

    df = load_results(name, storage, mlflow_uri, source)
    if df.empty:
        raise SweeperError(f"sweep {name!r} has no trials yet")
    stats = [s.strip() for s in statistics.split(",") if s.strip()] if statistics else None
    check_population(df)  # a bad input is one line on stderr: checked before any progress line
    n = len(completed(df))
    if progress is not None:
        progress(
            f"detect: {len(df)} trials read from {str(df.attrs.get('source', '')).split(' (')[0]}; scoring "
            f"{len(check_statistics(completed(df), stats))} statistics over {n} completed models "
            f"({n_boot} bootstrap resamples)…"
        )
    table = detection_table(df, stats, n_boot)
    lag = detectability_lag(table)
    text = [
        f"detection over {n} completed models of {name} (AUROC of poisoned vs clean models, "
        f"{n_boot} bootstrap resamples; directions fixed by the trial code's registry), one table per "
        "access level (what a defender holds); statistics are ranked by AUROC within a level only:",
        *level_tables(table),
        "\ndetectability lag (theta_asr: smallest theta with mean ASR >= 0.5; theta_detect: smallest theta "
        "whose AUROC lower bound >= 0.9):",
        lag.sort_values("access", key=lambda c: c.map(level_order), kind="stable").to_string(
            index=False, float_format=lambda v: f"{v:.3g}"
        ),
    ]
    data = data_level_auroc(df)
    if not data.empty:
        text += [
            "\n[training-set] data-level baselines, per-sample AUROC of finding the poisoned training samples "
            "(mean, std, count over the poisoned models of each cell):",
            data.to_string(index=False, float_format=lambda v: f"{v:.3g}"),
        ]
    return {
        "table": table,
        "lag": lag,
        "data_level": data,
        "text": "\n".join(text),
        "source": str(df.attrs.get("source", "")),
    }
