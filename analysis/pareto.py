"""Non-dominated sets (safety-efficacy frontiers) and hypervolumes.

A point is on the frontier when no other point is at least as good in every objective and
strictly better in one. Identical points never dominate each other, so duplicates of a frontier
point are all kept; ties in one objective are resolved by the others. Two objectives take
O(n log n) (one lexicographic sort and prefix minima).
More objectives sort by the sum and filter against the running front (about O(n x front size)).
Default objectives: maximize ``clean_acc``, minimize ``asr``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

DEFAULT_OBJECTIVES = (("clean_acc", "max"), ("asr", "min"))


def _as_min(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    signs = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    return np.asarray(values, dtype=np.float64) * signs


def pareto_mask(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``values`` (n, d); ``directions`` are 'max'/'min'.

    Rows containing NaN are never on the frontier.
    """
    v = _as_min(values, directions)
    n, d = v.shape
    if len(directions) != d:
        raise ValueError(f"{len(directions)} directions for {d} objectives")
    finite = ~np.isnan(v).any(axis=1)
    mask = np.zeros(n, dtype=bool)
    idx = np.flatnonzero(finite)
    if len(idx) == 0:
        return mask
    w = v[idx]
    mask[idx] = _front2(w) if d == 2 else _front_nd(w)
    return mask


def _front2(w: np.ndarray) -> np.ndarray:
    order = np.lexsort((w[:, 1], w[:, 0]))  # by f0, then f1
    f0, f1 = w[order, 0], w[order, 1]
    starts = np.flatnonzero(np.r_[True, f0[1:] != f0[:-1]])  # groups of equal f0
    group_min = np.minimum.reduceat(f1, starts)
    sizes = np.diff(np.r_[starts, len(f0)])
    # best f1 among groups with strictly smaller f0; the first group has none (not "+inf": a point
    # whose f1 is +inf must still survive when nothing has a smaller f0)
    prev_best = np.r_[np.inf, np.minimum.accumulate(group_min)[:-1]]
    first = np.r_[True, np.zeros(len(starts) - 1, dtype=bool)]
    gmin_rep, prev_rep, first_rep = (np.repeat(a, sizes) for a in (group_min, prev_best, first))
    keep_sorted = (f1 == gmin_rep) & ((f1 < prev_rep) | first_rep)
    keep = np.empty_like(keep_sorted)
    keep[order] = keep_sorted
    return keep


def _dominated_by(cand: np.ndarray, by: np.ndarray, block: int = 1024) -> np.ndarray:
    """For each row of ``cand``: is it dominated by some row of ``by``? (vectorised, blockwise)"""
    out = np.zeros(len(cand), dtype=bool)
    if len(by) == 0:
        return out
    for s in range(0, len(cand), block):
        a = cand[s : s + block][:, None, :]
        out[s : s + block] = ((by[None] <= a).all(axis=2) & (by[None] < a).any(axis=2)).any(axis=1)
    return out


def _front_nd(w: np.ndarray, block: int = 128) -> np.ndarray:
    # If q dominates p then sum(q) <= sum(p), also in floating point (rounding is monotone), so after
    # sorting by the sum every point need only be checked against the front of the points before it
    # and its own block; a final check of the front against itself settles equal-sum ties.
    if not np.isfinite(w).all():  # inf - inf sums are NaN: fall back to the plain all-pairs check
        return ~_dominated_by(w, w)
    order = np.argsort(w.sum(axis=1), kind="stable")
    front: list[np.ndarray] = []
    front_idx: list[np.ndarray] = []
    current = np.empty((0, w.shape[1]))
    for s in range(0, len(order), block):
        idx = order[s : s + block]
        b = w[idx]
        keep = ~_dominated_by(b, current) & ~_dominated_by(b, b)
        if keep.any():
            front.append(b[keep])
            front_idx.append(idx[keep])
            current = np.concatenate(front)
    mask = np.zeros(len(w), dtype=bool)
    if front_idx:
        fi = np.concatenate(front_idx)
        mask[fi[~_dominated_by(current, current)]] = True
    return mask


def frontier(
    df: pd.DataFrame, objectives: Sequence[tuple[str, str]] = DEFAULT_OBJECTIVES, group_by: Sequence[str] | None = None
) -> pd.DataFrame:
    """Rows of ``df`` on the frontier (per group when ``group_by`` is given), best-first by the first objective."""
    cols = [c for c, _ in objectives]
    dirs = [d for _, d in objectives]
    missing = [c for c in cols + list(group_by or []) if c not in df.columns]
    if missing:
        raise KeyError(f"column(s) {missing} not in the results; available: {sorted(df.columns)}")
    if df.empty:
        return df.copy()
    if group_by:
        parts = [
            g[pareto_mask(g[cols].to_numpy(dtype=float), dirs)]
            for _, g in df.groupby(list(group_by), sort=True, dropna=False)
        ]
        out = pd.concat(parts) if parts else df.iloc[:0]
    else:
        out = df[pareto_mask(df[cols].to_numpy(dtype=float), dirs)]
    return out.sort_values(
        list(group_by or []) + [cols[0]], ascending=[True] * len(group_by or []) + [dirs[0] == "min"]
    )


def _config_columns(df: pd.DataFrame, keep: Sequence[str] = ()) -> list[str]:
    """The columns that name a configuration: every hashable config field but the seed, plus ``keep``."""
    from .results import CONFIG_FIELDS, DERIVED_CONFIG

    named = set(CONFIG_FIELDS) | set(DERIVED_CONFIG)
    cols = [c for c in df.columns if c in named and c != "seed" and df[c].map(_hashable).all()]
    return list(dict.fromkeys(cols + [c for c in keep if c in df.columns and c != "seed"]))


def aggregate_seeds(df: pd.DataFrame, metrics: Sequence[str], by: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean, std and count of ``metrics`` over seeds: one row per configuration (all config columns but seed).

    The mean keeps the metric's name (so frontiers can be drawn on it); ``<metric>_std`` (the sample
    standard deviation over seeds, ddof 1: NaN for a single seed) and ``n_seeds`` are added.
    """
    by = _config_columns(df) if by is None else list(by)
    if not by:  # every row is the same configuration: one row (groupby refuses an empty key list)
        df, by = df.assign(_config=0), ["_config"]
    agg = df.groupby(by, dropna=False, sort=True)[list(metrics)].agg(["mean", "std"])
    agg.columns = [m if s == "mean" else f"{m}_std" for m, s in agg.columns]
    agg["n_seeds"] = df.groupby(by, dropna=False, sort=True).size()
    return agg.reset_index().drop(columns="_config", errors="ignore")


def has_seed_replicates(df: pd.DataFrame) -> bool:
    """True when some configuration appears with more than one seed (rows equal in every config field
    but ``seed``): its points differ only by seed noise and should be averaged before a frontier."""
    if df.empty or "seed" not in df.columns or df["seed"].nunique(dropna=True) < 2:
        return False
    by = _config_columns(df)
    return bool(df.groupby(by, dropna=False).size().gt(1).any()) if by else True


def seed_frontier(
    df: pd.DataFrame,
    objectives: Sequence[tuple[str, str]] = DEFAULT_OBJECTIVES,
    group_by: Sequence[str] | None = None,
    aggregate: bool | None = None,
    metrics: Sequence[str] = (),
) -> pd.DataFrame:
    """The frontier over configurations: seeds averaged first, then :func:`frontier` on the means.

    ``aggregate`` None averages exactly when :func:`has_seed_replicates` (a sweep without repeated
    seeds gives :func:`frontier`'s rows unchanged); True always, False never (one point per seed).
    Averaged rows hold each objective's mean under its own name, ``<objective>_std`` (std over seeds,
    ddof 1) and ``n_seeds``; ``metrics`` names further columns averaged the same way, and the
    ``group_by`` columns are kept as configuration columns.
    """
    if "seed" in (group_by or []):  # a frontier per seed is a per-seed frontier by request
        aggregate = False
    if aggregate is None:
        aggregate = has_seed_replicates(df)
    if aggregate and not df.empty:
        cols = [c for c, _ in objectives]
        missing = [c for c in cols if c not in df.columns]
        if missing:  # the same message frontier() gives
            raise KeyError(f"column(s) {missing} not in the results; available: {sorted(df.columns)}")
        by = _config_columns(df, keep=list(group_by or []))
        extra = [m for m in metrics if m in df.columns and m not in by and pd.api.types.is_numeric_dtype(df[m])]
        df = aggregate_seeds(df, list(dict.fromkeys(cols + extra)), by)
    return frontier(df, objectives, group_by)


def _hashable(v) -> bool:
    try:
        hash(v)
        return True
    except TypeError:
        return False


def hypervolume(values: np.ndarray, directions: Sequence[str], reference: Sequence[float]) -> float:
    """Volume dominated by ``values`` and bounded by ``reference`` (a point worse than all of interest).

    Exact: a sweep for two objectives, recursive slicing (HSO) for more. Points not strictly better
    than the reference in every objective contribute nothing.
    """
    v = _as_min(values, directions)
    ref = _as_min(np.asarray(reference, dtype=np.float64)[None], directions)[0]
    v = v[~np.isnan(v).any(axis=1)]
    v = v[(v < ref).all(axis=1)]
    if len(v) == 0:
        return 0.0
    v = v[_front_nd(v) if v.shape[1] > 2 else _front2(v)]
    return float(_hv(np.unique(v, axis=0), ref))


def _hv(v: np.ndarray, ref: np.ndarray) -> float:
    if v.shape[1] == 1:
        return float(ref[0] - v[:, 0].min())
    if v.shape[1] == 2:
        order = np.argsort(v[:, 0])
        x, y = v[order, 0], v[order, 1]
        best = np.minimum.accumulate(y)
        widths = np.diff(np.r_[x, ref[0]])
        return float(np.sum(widths * (ref[1] - best)))
    order = np.argsort(v[:, -1])  # slice along the last objective
    v = v[order]
    total = 0.0
    for i in range(len(v)):
        upper = v[i + 1, -1] if i + 1 < len(v) else ref[-1]
        depth = upper - v[i, -1]
        if depth > 0:
            sl = v[: i + 1, :-1]
            sl = sl[_front_nd(sl) if sl.shape[1] > 2 else _front2(sl)]
            total += depth * _hv(sl, ref[:-1])
    return total
