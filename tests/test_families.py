"""analysis/families.py: each defence family's best configuration per threat cell, on a hand-made frame."""

import pandas as pd
import pytest

from analysis.families import family_table
from analysis.results import defence_family


def _rows():
    rows = []
    # theta 0.05: undefended 0.96/0.9; penalty 400 costs 0.11 for ASR 0.2; penalty 100 costs 0.01, ASR 0.8;
    # filter ss costs 0.02 for ASR 0.05 (seeds 0.04, 0.06)
    for seed, (none, p100, p400, ss) in enumerate(
        [((0.96, 0.9), (0.95, 0.8), (0.85, 0.2), (0.94, 0.04)), ((0.96, 0.9), (0.95, 0.8), (0.85, 0.2), (0.94, 0.06))]
    ):
        for filt, kappa, (acc, asr) in (("none", 0, none), ("none", 100, p100), ("none", 400, p400), ("ss", 0, ss)):
            rows.append(
                dict(theta=0.05, seed=seed, kappa=kappa, augment=False, defence_filter=filt, clean_acc=acc, asr=asr)
            )
    for row in [r for r in rows if r["kappa"] == 0 and r["defence_filter"] == "none"]:
        rows.append({**row, "theta": 0.1})  # a second threat cell with only the undefended model
    df = pd.DataFrame(rows).assign(status="completed")
    df["defence_family"] = [
        defence_family(f, k, a) for f, k, a in zip(df.defence_filter, df.kappa, df.augment, strict=True)
    ]
    return df


def test_each_family_keeps_its_lowest_asr_within_the_accuracy_budget():
    t = family_table(_rows(), max_drop=0.05).set_index(["theta", "defence_family"])
    assert t.loc[(0.05, "penalty"), "kappa"] == 100  # 400 gives up 0.11 > 0.05: the budget keeps 100
    assert t.loc[(0.05, "filter ss"), "asr"] == pytest.approx(0.05)
    assert t.loc[(0.05, "filter ss"), "asr_std"] == pytest.approx(0.0141421356, rel=1e-6)
    assert t.loc[(0.05, "filter ss"), "acc_drop"] == pytest.approx(0.02)
    assert t.loc[(0.05, "none"), "n_seeds"] == 2 and (0.1, "penalty") not in t.index
    loose = family_table(_rows(), max_drop=0.2).set_index(["theta", "defence_family"])
    assert loose.loc[(0.05, "penalty"), "kappa"] == 400


def test_the_family_names_join_filter_penalty_and_augmentation():
    assert defence_family("none", 0.0, False) == "none"
    assert defence_family("curvature", 400.0, True) == "filter curvature + penalty + augment"
    assert defence_family(float("nan"), 10, "False") == "penalty"


def test_frontier_points_take_a_marker_per_family(tmp_path):
    from analysis.frontier_plot import FAMILY_MARKERS, family_markers, plot_frontier

    markers = family_markers(["penalty", "none", "filter ss", "filter curvature + penalty"])
    assert markers["none"] == "o" and len(set(markers.values())) == 4  # none first, every family its own
    assert set(family_markers([f"f{i}" for i in range(12)]).values()) == set(FAMILY_MARKERS)  # reused past ten
    paths = plot_frontier(_rows(), tmp_path, group_by=("theta",))
    assert {p.suffix for p in paths} == {".png", ".svg"} and all(p.stat().st_size > 0 for p in paths)
    assert "family: filter ss" in (tmp_path / "frontier.svg").read_text()  # the legend names the families
