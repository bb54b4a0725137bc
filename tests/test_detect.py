"""Detection scored over populations of models (analysis/detect.py) and `sweeper detect`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from analysis.detect import auroc_with_ci, detectability_lag, detection_table, tpr_at_fpr
from sweeper.cli import main
from tests.conftest import ONE_WORKER
from trainables.config import SweeperError


def test_auroc_matches_a_hand_count_and_scikit_learn():
    p, c = np.array([0.9, 0.8, 0.4]), np.array([0.1, 0.5, 0.3])
    auc, lo, hi = auroc_with_ci(p, c, n_boot=500)
    assert auc == pytest.approx(8 / 9)  # 0.4 beats 0.1 and 0.3 but not 0.5: 8 of 9 pairs
    assert auc == pytest.approx(roc_auc_score([1, 1, 1, 0, 0, 0], np.r_[p, c]))
    assert 0 <= lo <= auc <= hi <= 1
    assert auroc_with_ci(np.array([2.0, 3.0]), np.array([0.0, 1.0]), n_boot=200) == (1.0, 1.0, 1.0)
    assert math.isnan(auroc_with_ci(np.array([np.nan]), c)[0])  # NaN scores are dropped, not ranked


def test_a_statistic_without_signal_scores_one_half_with_an_interval_covering_it():
    rng = np.random.default_rng(0)
    auc, lo, hi = auroc_with_ci(rng.normal(size=40), rng.normal(size=40), n_boot=1000)
    assert abs(auc - 0.5) < 0.15 and lo < 0.5 < hi
    # the comparison can fail: a real signal's interval excludes one half
    auc, lo, hi = auroc_with_ci(rng.normal(1.5, 1, size=40), rng.normal(size=40), n_boot=1000)
    assert lo > 0.5


def test_tpr_at_five_percent_fpr():
    clean = np.arange(20, dtype=float)  # one clean model above 18.5 is a 5% FPR
    assert tpr_at_fpr(np.array([30.0, 25.0, 18.5, 10.0]), clean) == 0.75  # at >= 18.5 only clean 19 passes (5%)
    assert tpr_at_fpr(np.array([30.0, 25.0, 17.5, 10.0]), clean) == 0.5  # 17.5 would let 18 and 19 pass (10%)
    assert tpr_at_fpr(np.array([100.0, 200.0]), clean) == 1.0


def _population(seeds=10) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for kappa in (0.0, 400.0):
        for theta in (0.0, 0.05, 0.1):
            for seed in range(seeds):
                signal = 3.0 if (kappa == 0 and theta == 0.1) else 0.0  # visible only at theta 0.1, kappa 0
                rows.append(
                    {
                        "status": "completed",
                        "theta": theta,
                        "kappa": kappa,
                        "seed": seed,
                        "asr": 0.9 if theta >= 0.05 else 0.01,
                        "clean_acc": 0.95,
                        "det_flip_max": rng.normal(signal, 1.0),
                        "max_overlap_sq": rng.normal(signal, 1.0),
                    }
                )
    return pd.DataFrame(rows)


def test_detection_table_and_lag_on_a_synthetic_population():
    table = detection_table(_population(), n_boot=300)
    assert set(table["statistic"]) == {"det_flip_max", "max_overlap_sq"}
    assert table.loc[table["statistic"] == "max_overlap_sq", "oracle"].all()
    row = table[(table["kappa"] == 0) & (table["theta"] == 0.1) & (table["statistic"] == "det_flip_max")].iloc[0]
    assert row["auroc_lo"] >= 0.9 and row["n_poisoned"] == 10 and row["n_clean"] == 10
    lag = detectability_lag(table).set_index(["kappa", "statistic"])
    assert lag.loc[(0.0, "det_flip_max"), "theta_asr"] == 0.05
    assert lag.loc[(0.0, "det_flip_max"), "theta_detect"] == 0.1
    assert lag.loc[(0.0, "det_flip_max"), "lag"] == pytest.approx(0.05)
    assert math.isnan(lag.loc[(400.0, "det_flip_max"), "theta_detect"])  # never detected under the penalty


def test_a_population_that_cannot_be_scored_says_what_to_add():
    df = _population()
    with pytest.raises(SweeperError, match="add theta 0"):
        detection_table(df[df["theta"] > 0])
    with pytest.raises(SweeperError, match="add seeds"):
        detection_table(df[df["seed"] == 0])


def test_sweeper_detect_on_a_real_seeded_sweep(tmp_path, capsys):
    st = str(tmp_path)
    argv = [
        "run",
        "--theta",
        "0,0.2",
        "--kappa",
        "0",
        "--seeds",
        "2",
        "--epochs",
        "1",
        "--set",
        "hessian_samples=50",
        "--set",
        "geometry=false",
        "--set",
        "hessian_split=auto,test",  # the same models' spectra on the training set as trained and on clean data
        "--name",
        "pop",
        "--storage",
        st,
        "--quiet",
        *ONE_WORKER,
    ]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    csv = tmp_path / "det.csv"
    assert main(["detect", "pop", "--storage", st, "--bootstrap", "200", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "det_flip_max" in out and "detectability lag" in out
    assert out.index("[clean-data]") < out.index("[training-set]") < out.index("[oracle]") < out.index("max_overlap_sq")
    table = pd.read_csv(csv)
    assert (table["n_poisoned"] == 2).all() and (table["n_clean"] == 2).all() and table["auroc"].between(0, 1).all()
    # issue 22: a statistic takes the level of its spectrum's data; the oracle stays oracle
    level = table.set_index(["hessian_split", "statistic"])["access"]
    assert level[("test", "det_class_flip_max")] == "clean-data" and level[("test", "det_lambda_ratio")] == "clean-data"
    assert level[("auto", "det_class_flip_max")] == "training-set" and level[("auto", "det_ipr_1")] == "training-set"
    assert level[("auto", "max_overlap_sq")] == "oracle" and level[("test", "max_overlap_sq")] == "oracle"
    assert set(table["access"]) == {"clean-data", "training-set", "oracle"}
    assert main(["report", "pop", "--storage", st]) == 0
    figures = sorted(p.name for p in (tmp_path / "pop-report").glob("detection_*.png"))
    assert len(figures) == 4 and all("hessian_split" in f for f in figures), figures  # overview + all, per split
    assert "Detection over model populations" in (tmp_path / "pop-report" / "summary.md").read_text()


def test_sweeper_detect_without_seeds_or_clean_models_exits_2_with_what_to_add(grid_sweep, capsys):
    storage, _ = grid_sweep  # theta 0 and 0.1, one seed
    assert main(["detect", "grid", "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    assert "add seeds" in err and len(err.strip().splitlines()) == 1


def test_data_level_auroc_is_averaged_per_cell_of_defence_settings():
    """The baselines' per-sample AUROC is a mean over the poisoned models of one cell and theta: kappa 0
    and 400 are not pooled (they were once)."""
    from analysis.detect import data_level_auroc

    df = _population(seeds=4)
    df["ss_auroc"] = np.where(df["theta"] > 0, np.where(df["kappa"] == 0, 0.6, 0.9), np.nan)
    out = data_level_auroc(df).set_index(["kappa", "theta"])
    assert out.loc[(0.0, 0.05), "ss_auroc_mean"] == pytest.approx(0.6)
    assert out.loc[(400.0, 0.1), "ss_auroc_mean"] == pytest.approx(0.9)
    assert (out["ss_auroc_count"] == 4).all() and len(out) == 4
