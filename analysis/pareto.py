"""Non-dominated sets (safety-efficacy frontiers) and hypervolumes.

A point is on the frontier when no other point is at least as good in every objective and
strictly better in one. Identical points never dominate each other, so duplicates of a frontier
point are all kept; ties in one objective are resolved by the others. Two objectives take
O(n log n) (one lexicographic sort and prefix minima); more use a vectorised O(n^2) scan.
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
    # best f1 among groups with strictly smaller f0
    prev_best = np.r_[np.inf, np.minimum.accumulate(group_min)[:-1]]
    gmin_rep, prev_rep = np.repeat(group_min, sizes), np.repeat(prev_best, sizes)
    keep_sorted = (f1 == gmin_rep) & (f1 < prev_rep)
    keep = np.empty_like(keep_sorted)
    keep[order] = keep_sorted
    return keep


def _front_nd(w: np.ndarray, block: int = 2048) -> np.ndarray:
    n = len(w)
    dominated = np.zeros(n, dtype=bool)
    for s in range(0, n, block):
        a = w[s:s + block][:, None, :]  # candidates
        le = (w[None, :, :] <= a).all(axis=2)
        lt = (w[None, :, :] < a).any(axis=2)
        dominated[s:s + block] = (le & lt).any(axis=1)
    return ~dominated


def frontier(df: pd.DataFrame, objectives: Sequence[tuple[str, str]] = DEFAULT_OBJECTIVES,
             group_by: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows of ``df`` on the frontier (per group when ``group_by`` is given), best-first by the first objective."""
    cols = [c for c, _ in objectives]
    dirs = [d for _, d in objectives]
    missing = [c for c in cols + list(group_by or []) if c not in df.columns]
    if missing:
        raise KeyError(f"column(s) {missing} not in the results; available: {sorted(df.columns)}")
    if df.empty:
        return df.copy()
    if group_by:
        parts = [g[pareto_mask(g[cols].to_numpy(dtype=float), dirs)]
                 for _, g in df.groupby(list(group_by), sort=True, dropna=False)]
        out = pd.concat(parts) if parts else df.iloc[:0]
    else:
        out = df[pareto_mask(df[cols].to_numpy(dtype=float), dirs)]
    return out.sort_values(list(group_by or []) + [cols[0]], ascending=[True] * len(group_by or []) + [dirs[0] == "min"])
