"""Defence families side by side: what each family (the penalty, a filter, both) costs and buys, per threat.

A sweep over ``defence_filter`` x ``kappa`` (x augmentation) gives each completed trial a ``defence_family``
(:func:`analysis.results.defence_family`). :func:`family_table` averages the seeds of every configuration
and, per threat cell (theta, trigger, ...) and family, keeps its best configuration: the one with the lowest
mean ASR among those within ``max_drop`` of the undefended model's clean accuracy (the user's question: how
much accuracy must a model give up to stop the backdoor), else the lowest ASR at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from .results import completed

METRICS = (
    "clean_acc",
    "asr",
    "pre_filter_clean_acc",
    "pre_filter_asr",
    "filter_precision",
    "filter_recall",
    "train_seconds",
)
THREATS = ("dataset", "trigger", "target_mode", "theta")
MAX_DROP = 0.05  # the clean accuracy a defence may give up and still be preferred for its lower ASR


def family_table(
    df: pd.DataFrame, threats: Sequence[str] = THREATS, max_drop: float = MAX_DROP, best: bool = True
) -> pd.DataFrame:
    """Per threat cell and defence family: seed means (``<metric>``), ``<metric>_std`` and ``n_seeds`` of
    the family's best configuration (``best``; else every configuration), with ``acc_drop`` (clean
    accuracy given up against the undefended configuration of the same cell, ``none`` family)."""
    ok = completed(df)
    if ok.empty or "defence_family" not in ok.columns:
        return pd.DataFrame()
    cells = [c for c in threats if c in ok.columns]
    config = [c for c in ("defence_family", "defence_filter", "kappa", "augment", "filter_fraction") if c in ok]
    metrics = [m for m in METRICS if m in ok.columns]
    keys = cells + config
    grouped = ok.groupby(keys, dropna=False, sort=True)
    table = grouped[metrics].mean()
    table = table.join(grouped[["clean_acc", "asr"]].std().add_suffix("_std"))
    table["n_seeds"] = grouped.size()
    table = table.reset_index()
    undefended = table[table["defence_family"] == "none"]
    if cells:  # the undefended model's clean accuracy in each threat cell
        base = undefended.groupby(cells, dropna=False)["clean_acc"].max().rename("_base").reset_index()
        table = table.merge(base, on=cells, how="left")
    else:
        table["_base"] = undefended["clean_acc"].max() if not undefended.empty else float("nan")
    table["acc_drop"] = table.pop("_base") - table["clean_acc"]
    if not best:
        return table
    rows = []
    for _, g in table.groupby([*cells, "defence_family"], dropna=False, sort=True):
        within = g[g["acc_drop"] <= max_drop]
        rows.append((within if not within.empty else g).sort_values(["asr", "acc_drop"]).iloc[0])
    return pd.DataFrame(rows).reset_index(drop=True)
