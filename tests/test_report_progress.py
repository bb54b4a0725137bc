"""Where `report` and `detect` spend their time: the AUROC bootstrap without one scikit-learn call
per resample (same numbers), and progress lines on stderr for the steps that take seconds."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from analysis.detect import auroc_with_ci
from sweeper.cli import main


def per_resample(poisoned, clean, n_boot=1000, seed=0, level=0.95):
    """The interval as it was computed before: roc_auc_score on every resample, in the same seeded order."""
    p, c = np.asarray(poisoned, float), np.asarray(clean, float)
    y = np.r_[np.ones(len(p)), np.zeros(len(c))]
    rng = np.random.default_rng(seed)
    boots = [
        roc_auc_score(y, np.r_[p[rng.integers(0, len(p), len(p))], c[rng.integers(0, len(c), len(c))]])
        for _ in range(n_boot)
    ]
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return roc_auc_score(y, np.r_[p, c]), lo, hi


@pytest.mark.parametrize(
    ("n_p", "n_c", "ties"), [(1, 1, False), (3, 3, False), (3, 5, True), (12, 7, True), (40, 25, False)]
)
def test_bootstrap_interval_equals_one_roc_auc_score_per_resample(n_p, n_c, ties):
    rng = np.random.default_rng(n_p * 100 + n_c)
    p, c = rng.normal(0.6, 1.0, n_p), rng.normal(0.0, 1.0, n_c)
    if ties:  # rounded scores: ties within and across the groups count half
        p, c = np.round(p), np.round(c)
    assert auroc_with_ci(p, c, n_boot=500, seed=3) == pytest.approx(per_resample(p, c, 500, 3), abs=1e-12)


def test_bootstrap_of_a_large_population_brackets_its_estimate():
    # its speed is never asserted in a test (speed targets belong in benchmarks/)
    rng = np.random.default_rng(0)
    auc, lo, hi = auroc_with_ci(rng.normal(1, 1, 300), rng.normal(0, 1, 300), n_boot=2000)
    assert lo < auc < hi


def test_report_and_detect_say_what_they_are_doing_and_a_bad_input_stays_one_line(grid_sweep, tmp_path, capsys):
    storage, _ = grid_sweep
    capsys.readouterr()
    assert (
        main(["report", "grid", "--storage", str(storage), "--out", str(tmp_path / "rep"), "--no-log-to-mlflow"]) == 0
    )
    err = capsys.readouterr().err
    for step in (
        "6 trials read from mlflow",
        "eigenvector images",
        "detection over 4 completed models",
        "writing results.csv",
    ):
        assert f"report: {step}" in err, err
    assert main(["report", "nosuch", "--storage", str(storage), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "none").exists(), err
    assert main(["detect", "grid", "--storage", str(storage)]) == 2  # one seed: nothing to score
    err = capsys.readouterr().err
    assert "add seeds" in err and len(err.strip().splitlines()) == 1, err  # said before any progress line
