"""analysis/roc.py against scikit-learn (and scipy's ranks) to 1e-12: random data with ties, infinite
scores, NaN, one-model groups, and one real sweep's table."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from analysis import roc

TOL = 1e-12


def sk_auroc(p, c) -> float:
    return float(roc_auc_score(np.r_[np.ones(len(p)), np.zeros(len(c))], np.r_[p, c]))


def sk_interval(p, c, n_boot, seed, level=0.95):
    """The reference interval: roc_auc_score on every resample, drawn from the same index arrays."""
    ip, ic = roc.bootstrap_indices(len(p), len(c), n_boot, seed)
    boots = [sk_auroc(p[ip[b]], c[ic[b]]) for b in range(n_boot)]
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return sk_auroc(p, c), lo, hi


def sk_tpr(p, c, fpr=0.05) -> float:
    f, t, _ = sk_roc_curve(np.r_[np.ones(len(p)), np.zeros(len(c))], np.r_[p, c], drop_intermediate=False)
    return float(t[f <= fpr + 1e-12].max())


def samples(seed: int, n_p: int, n_c: int, ties: bool):
    rng = np.random.default_rng(seed)
    p, c = rng.normal(0.7, 1.0, n_p), rng.normal(0.0, 1.0, n_c)
    if ties:  # rounded scores: ties within and across the groups
        p, c = np.round(p * 2) / 2, np.round(c * 2) / 2
    return p, c


CASES = [(1, 1, False), (2, 3, True), (7, 12, True), (25, 40, False), (60, 45, True), (150, 120, True)]


@pytest.mark.parametrize(("n_p", "n_c", "ties"), CASES)
def test_auroc_roc_curve_and_tpr_equal_scikit_learn_on_random_data_with_ties(n_p, n_c, ties):
    p, c = samples(n_p * 1000 + n_c, n_p, n_c, ties)
    assert roc.auroc(p, c) == pytest.approx(sk_auroc(p, c), abs=TOL)
    f, t = roc.roc_curve(p, c)
    sf, st, _ = sk_roc_curve(np.r_[np.ones(n_p), np.zeros(n_c)], np.r_[p, c], drop_intermediate=False)
    np.testing.assert_allclose(f, sf, atol=TOL, rtol=0)
    np.testing.assert_allclose(t, st, atol=TOL, rtol=0)
    for rate in (0.0, 0.05, 0.1, 0.5):
        assert roc.tpr_at_fpr(p, c, rate) == pytest.approx(sk_tpr(p, c, rate), abs=TOL)
    np.testing.assert_allclose(roc.average_ranks(np.r_[p, c]), rankdata(np.r_[p, c]), atol=TOL, rtol=0)


@pytest.mark.parametrize(("n_p", "n_c", "ties"), CASES)
def test_bootstrap_interval_equals_one_roc_auc_score_per_resample_with_the_same_draws(n_p, n_c, ties):
    p, c = samples(n_p + 7 * n_c, n_p, n_c, ties)
    n_boot = 300 if n_p > 100 else 1000
    assert roc.auroc_with_ci(p, c, n_boot=n_boot, seed=3) == pytest.approx(sk_interval(p, c, n_boot, 3), abs=TOL)


def test_the_interval_comparison_can_fail_another_seed_gives_another_interval():
    p, c = samples(5, 25, 40, True)
    ours = roc.auroc_with_ci(p, c, n_boot=1000, seed=3)
    other = sk_interval(p, c, 1000, 4)
    assert ours[0] == pytest.approx(other[0], abs=TOL)  # the estimate does not depend on the draws
    assert abs(ours[1] - other[1]) > TOL or abs(ours[2] - other[2]) > TOL


def test_blocks_of_resamples_give_the_same_interval(monkeypatch):
    p, c = samples(11, 30, 20, True)
    whole = roc.bootstrap_auroc(p, c, 500, 1)
    monkeypatch.setattr(roc, "MAX_BLOCK", 30 * 7)  # 7 resamples a block: 72 blocks and a remainder
    np.testing.assert_allclose(roc.bootstrap_auroc(p, c, 500, 1), whole, atol=TOL, rtol=0)


def test_nan_is_dropped_infinite_scores_stay_in_order_and_empty_groups_give_nan():
    p = np.array([np.inf, 3.0, 2.0, np.nan])
    c = np.array([1.0, 0.5, np.nan, -np.inf])
    assert roc.auroc(p, c) == 1.0  # scikit-learn refuses infinity; ranks keep it in order
    assert roc.auroc_with_ci(p, c, n_boot=200) == (1.0, 1.0, 1.0)
    assert roc.tpr_at_fpr(np.array([np.inf, 3.0]), np.array([1.0, 4.0])) == 0.5
    assert all(math.isnan(v) for v in roc.auroc_with_ci(np.array([np.nan]), c))
    assert math.isnan(roc.tpr_at_fpr(np.array([]), c))
    auc, lo, hi = roc.auroc_with_ci(p, c, n_boot=0)  # no resamples: the estimate, no interval
    assert auc == 1.0 and math.isnan(lo) and math.isnan(hi)


def test_one_real_sweeps_table_scores_as_scikit_learn_scores_it(grid_sweep):
    from analysis.detect import detection_statistics
    from analysis.results import completed, load_results

    storage, _ = grid_sweep
    ok = completed(load_results("grid", storage))
    stats = detection_statistics(ok)
    assert len(stats) >= 5
    checked = 0
    for s in stats:
        p = ok.loc[ok["theta"] > 0, s].dropna().to_numpy()
        c = ok.loc[ok["theta"] == 0, s].dropna().to_numpy()
        if len(p) == 0 or len(c) == 0 or not np.isfinite(np.r_[p, c]).all():
            continue
        assert roc.auroc(p, c) == pytest.approx(sk_auroc(p, c), abs=TOL), s
        assert roc.tpr_at_fpr(p, c) == pytest.approx(sk_tpr(p, c), abs=TOL), s
        assert roc.auroc_with_ci(p, c, 200, 0) == pytest.approx(sk_interval(p, c, 200, 0), abs=TOL), s
        checked += 1
    assert checked >= 5
