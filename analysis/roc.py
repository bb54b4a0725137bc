"""ROC statistics of telling positives (poisoned models) from negatives (clean ones), as arrays.

Everything here is rank arithmetic in numpy, with no scikit-learn or scipy on the path (their imports
alone take over a second): the AUROC is the Mann-Whitney statistic U / (n₊n₋) with ties counted half,
which is what ``sklearn.metrics.roc_auc_score`` computes with its trapezoids; the ROC curve is the full
one, a point per distinct score (``roc_curve(..., drop_intermediate=False)``), so that the largest TPR
at a false-positive rate is read off every threshold. Tests compare each function with scikit-learn to
1e-12 on random data with ties, and on a real sweep's table.

The bootstrap interval resamples models with replacement within each group (both groups stay
present), as index arrays drawn in a fixed order from ``numpy.random.default_rng(seed)``: first the
``n_boot × n₊`` positive indices, then the ``n_boot × n₋`` negative ones. A resample's AUROC is then
one product of the two groups' draw counts with the pairwise win matrix, for every resample at once;
the draws depend only on (seed, n₊, n₋, n_boot), so every statistic of a cell shares them (cached).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

MAX_BLOCK = 2_000_000  # resamples × models per block of the product: its intermediate stays ~16 MB


def finite_pair(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two groups' scores as float arrays without NaN (a model whose statistic is missing is left
    out). Infinite scores stay: they are in order (a p-value that underflowed)."""
    p = np.asarray(pos, dtype=float).ravel()
    c = np.asarray(neg, dtype=float).ravel()
    return p[~np.isnan(p)], c[~np.isnan(c)]


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties sharing their mean rank (``scipy.stats.rankdata``'s default)."""
    x = np.asarray(x, dtype=float)
    n = len(x)
    if n == 0:
        return np.empty(0)
    order = np.argsort(x, kind="mergesort")
    s = x[order]
    new = np.r_[True, s[1:] != s[:-1]]  # first position of each run of equal values
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], n]  # one past each run
    mean_rank = (starts + 1 + ends) / 2.0  # ranks start..end-1 (0-based) -> mean of start+1..end (1-based)
    ranks = np.empty(n)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC of scores ``pos`` (label 1) against ``neg`` (label 0), higher = more positive; NaN scores
    are dropped; NaN when a group is empty."""
    p, c = finite_pair(pos, neg)
    if len(p) == 0 or len(c) == 0:
        return math.nan
    r = average_ranks(np.r_[p, c])[: len(p)]
    return float((r.sum() - len(p) * (len(p) + 1) / 2.0) / (len(p) * len(c)))


def roc_curve(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct score taken as the threshold (score >= threshold is flagged), from
    (0, 0) upward; scikit-learn's ``roc_curve(drop_intermediate=False)``. Empty arrays when a group is
    empty."""
    p, c = finite_pair(pos, neg)
    if len(p) == 0 or len(c) == 0:
        return np.empty(0), np.empty(0)
    scores = np.r_[p, c]
    label = np.r_[np.ones(len(p)), np.zeros(len(c))]
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], label[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last position of each distinct score: one threshold each
    tps = np.cumsum(y)[last]
    fps = np.cumsum(1.0 - y)[last]
    return np.r_[0.0, fps / len(c)], np.r_[0.0, tps / len(p)]


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float = 0.05) -> float:
    """The largest true-positive rate of the full ROC curve whose false-positive rate is at most ``fpr``
    (1e-12 of slack for the float division); NaN when a group is empty."""
    f, t = roc_curve(pos, neg)
    if len(f) == 0:
        return math.nan
    return float(t[f <= fpr + 1e-12].max())


@lru_cache(maxsize=16)  # a sweep's cells share a few population sizes
def bootstrap_counts(n_pos: int, n_neg: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """How often each model is drawn in each of ``n_boot`` resamples: (n_boot × n_pos, n_boot × n_neg),
    from the index arrays drawn in the module's fixed order. Read-only (shared through the cache)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (n_pos, n_neg):
        idx = rng.integers(0, n, (n_boot, n))
        flat = (idx + n * np.arange(n_boot)[:, None]).ravel()  # resample b's draws land in row b
        counts = np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(float)
        counts.flags.writeable = False
        out.append(counts)
    return out[0], out[1]


def bootstrap_indices(n_pos: int, n_neg: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The resample index arrays behind :func:`bootstrap_counts` (for references and tests)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_pos, (n_boot, n_pos)), rng.integers(0, n_neg, (n_boot, n_neg))


def bootstrap_auroc(pos: np.ndarray, neg: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """The AUROC of each of ``n_boot`` stratified resamples (models drawn with replacement within each
    group), all at once; empty when a group is empty."""
    p, c = finite_pair(pos, neg)
    if len(p) == 0 or len(c) == 0:
        return np.empty(0)
    n_p, n_c = bootstrap_counts(len(p), len(c), n_boot, seed)
    # a pair's win: 1 when the positive scores higher, 1/2 on a tie (the trapezoid of roc_auc_score)
    win = (p[:, None] > c[None, :]) + 0.5 * (p[:, None] == c[None, :])
    out = np.empty(n_boot)
    step = max(1, MAX_BLOCK // max(len(p), len(c)))
    for s in range(0, n_boot, step):
        out[s : s + step] = np.einsum("bc,bc->b", n_p[s : s + step] @ win, n_c[s : s + step])
    return out / (len(p) * len(c))


def auroc_with_ci(
    pos: np.ndarray, neg: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """AUROC with its stratified bootstrap percentile interval (``numpy.quantile``'s linear rule);
    NaN scores are dropped; NaN when either group is empty."""
    auc = auroc(pos, neg)
    if math.isnan(auc) or n_boot < 1:
        return auc, math.nan, math.nan
    boots = bootstrap_auroc(pos, neg, n_boot, seed)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return auc, float(lo), float(hi)
