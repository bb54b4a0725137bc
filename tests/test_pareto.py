import numpy as np
import pandas as pd
import pytest

from analysis.pareto import aggregate_seeds, frontier, has_seed_replicates, hypervolume, pareto_mask, seed_frontier
from trainables.errors import SweeperError
from trainables.record import parse_objectives


def brute_force(values, directions):
    v = np.asarray(values, dtype=float) * np.array([-1.0 if d == "max" else 1.0 for d in directions])
    n = len(v)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        if np.isnan(v[i]).any():
            keep[i] = False
            continue
        for j in range(n):
            if i != j and not np.isnan(v[j]).any() and (v[j] <= v[i]).all() and (v[j] < v[i]).any():
                keep[i] = False
                break
    return keep


@pytest.mark.parametrize(
    "d,directions",
    [
        (2, ["max", "min"]),
        (2, ["min", "min"]),
        (2, ["max", "max"]),
        (3, ["max", "min", "min"]),
        (3, ["min", "max", "max"]),
        (4, ["min", "min", "max", "min"]),
    ],
)
@pytest.mark.parametrize("seed", range(6))
def test_pareto_matches_brute_force_with_ties_and_duplicates(d, directions, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 120))
    values = rng.integers(0, 6, size=(n, d)).astype(float)  # a coarse grid: many ties and exact duplicates
    if n > 3:
        values[1] = values[0]
        values[rng.integers(0, n)] = np.nan
    assert np.array_equal(pareto_mask(values, directions), brute_force(values, directions))


def test_pareto_on_continuous_points_and_edge_cases():
    rng = np.random.default_rng(1)
    v = rng.random((500, 2))
    assert np.array_equal(pareto_mask(v, ["max", "min"]), brute_force(v, ["max", "min"]))
    assert pareto_mask(np.zeros((0, 2)), ["max", "min"]).shape == (0,)
    dup = np.array([[1.0, 1.0], [1.0, 1.0], [0.5, 2.0]])
    assert pareto_mask(dup, ["max", "min"]).tolist() == [True, True, False]


def test_a_wrong_front_fails_the_brute_force_comparison():
    v = np.array([[0.9, 0.1], [0.8, 0.2], [0.95, 0.5]])
    wrong = np.array([True, True, True])  # (0.8, 0.2) is dominated by (0.9, 0.1)
    assert not np.array_equal(wrong, brute_force(v, ["max", "min"]))
    assert np.array_equal(pareto_mask(v, ["max", "min"]), [True, False, True])


def test_hypervolume_hand_computed():
    # maximize acc, minimize asr; reference (acc 0, asr 1)
    pts = np.array([[0.9, 0.5], [0.6, 0.2], [0.5, 0.6]])  # the last is dominated
    # as min-problems: (-0.9, .5), (-0.6, .2); union of [-0.9,0]x[.5,1] and [-0.6,0]x[.2,1]
    expected = 0.9 * 0.5 + 0.6 * 0.3
    assert hypervolume(pts, ["max", "min"], [0.0, 1.0]) == pytest.approx(expected)
    cube = np.array([[1.0, 1.0, 1.0]])
    assert hypervolume(cube, ["min", "min", "min"], [2.0, 3.0, 4.0]) == pytest.approx(1 * 2 * 3)
    two = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # boxes [0,2]x[1,2]x[1,2] (vol 2) and [1,2]x[0,2]x[0,2] (vol 4), overlap [1,2]x[1,2]x[1,2] (vol 1)
    assert hypervolume(two, ["min", "min", "min"], [2.0, 2.0, 2.0]) == pytest.approx(5.0)
    assert hypervolume(pts, ["max", "min"], [1.0, 0.0]) == 0.0


def test_hypervolume_matches_monte_carlo_in_3d():
    rng = np.random.default_rng(0)
    pts = rng.random((12, 3))
    ref = np.ones(3)
    samples = rng.random((200_000, 3))
    dominated = (pts[None, :, :] <= samples[:, None, :]).all(axis=2).any(axis=1)
    assert hypervolume(pts, ["min"] * 3, ref) == pytest.approx(dominated.mean(), abs=5e-3)


def test_frontier_groups_and_seed_aggregation():
    df = pd.DataFrame(
        {
            "theta": [0.1] * 6 + [0.2] * 2,
            "kappa": [0, 0, 10, 10, 100, 100, 0, 10],
            "seed": [0, 1] * 4,
            "clean_acc": [0.95, 0.97, 0.93, 0.91, 0.6, 0.62, 0.9, 0.8],
            "asr": [0.9, 1.0, 0.5, 0.3, 0.6, 0.7, 1.0, 0.2],
        }
    )
    agg = aggregate_seeds(df, ["clean_acc", "asr"], by=["theta", "kappa"])
    assert len(agg) == 5 and agg["n_seeds"].tolist() == [2, 2, 2, 1, 1]
    row = agg[(agg.theta == 0.1) & (agg.kappa == 10)].iloc[0]
    assert row["clean_acc"] == pytest.approx(0.92) and row["asr"] == pytest.approx(0.4)
    assert row["asr_std"] == pytest.approx(np.std([0.5, 0.3], ddof=1))
    front = frontier(agg, group_by=["theta"])
    assert sorted(zip(front.theta, front.kappa, strict=True)) == [(0.1, 0), (0.1, 10), (0.2, 0), (0.2, 10)]
    assert frontier(agg[agg.theta == 0.1]).kappa.tolist() == [0, 10]  # kappa=100 is dominated
    with pytest.raises(KeyError, match="not in the results"):
        frontier(df, objectives=[("clean_acc", "max"), ("nope", "min")])
    third = parse_objectives("clean_acc:max,asr:min,lambda_1:min", search=False)[2]
    assert (third.metric, third.direction) == ("lambda_1", "min")
    with pytest.raises(SweeperError, match="'clean_acc:up' is invalid"):
        parse_objectives("clean_acc:up,asr:min", search=False)
    with pytest.raises(SweeperError, match="expected METRIC:max or METRIC:min$"):  # no aggregation outside a search
        parse_objectives("clean_acc:max:worst,asr:min", search=False)


def test_two_objective_path_keeps_a_point_whose_second_objective_is_inf():
    # (0, inf) has the smallest first objective: nothing dominates it; brute force agrees
    v = np.array([[0.0, np.inf], [1.0, 5.0]])
    assert pareto_mask(v, ["min", "min"]).tolist() == [True, True]
    assert pareto_mask(np.array([[0.0, np.inf], [1.0, np.inf]]), ["min", "min"]).tolist() == [True, False]
    assert pareto_mask(np.array([[0.0, -np.inf], [1.0, 5.0]]), ["min", "max"]).tolist() == [True, True]


def _seeded(seeds):
    """Two configurations (kappa 0 and 400) at two thetas, ``seeds`` seeds each, as a sweep's rows; a
    seed trades accuracy for ASR, so no seed dominates another."""
    rows = []
    for theta in (0.05, 0.1):
        for kappa, acc, asr in ((0.0, 0.96, 0.97), (400.0, 0.85, 0.19)):
            for seed in seeds:
                rows.append(
                    {
                        "theta": theta,
                        "kappa": kappa,
                        "epochs": 15,
                        "seed": seed,
                        "status": "completed",
                        "clean_acc": acc + 0.01 * seed,
                        "asr": asr + 0.02 * seed,
                        "lambda_1": 0.1 + seed,
                    }
                )
    return pd.DataFrame(rows)


def test_seed_frontier_averages_seeds_by_default():
    df = _seeded([0, 1, 2])
    assert has_seed_replicates(df)
    front = seed_frontier(df, group_by=["theta"], metrics=["lambda_1"])
    # one point per configuration, not three points of one configuration's seed noise
    assert len(front) == 4 and front["n_seeds"].tolist() == [3] * 4 and "seed" not in front.columns
    row = front[(front.theta == 0.05) & (front.kappa == 400)].iloc[0]
    assert row["clean_acc"] == pytest.approx(0.86) and row["asr"] == pytest.approx(0.21)
    assert row["clean_acc_std"] == pytest.approx(np.std([0.85, 0.86, 0.87], ddof=1))
    assert row["asr_std"] == pytest.approx(np.std([0.19, 0.21, 0.23], ddof=1))
    assert row["lambda_1"] == pytest.approx(1.1) and "lambda_1_std" in front.columns
    per_seed = seed_frontier(df, group_by=["theta"], aggregate=False)
    assert "n_seeds" not in per_seed.columns and len(per_seed) == 12  # each seed is its own point
    assert seed_frontier(df, group_by=["seed"])["seed"].nunique() == 3  # a frontier per seed: never averaged


def test_seed_frontier_without_seeds_is_the_plain_frontier():
    for df in (_seeded([0]), _seeded([0]).drop(columns="seed"), _seeded([7])):
        assert not has_seed_replicates(df)
        pd.testing.assert_frame_equal(seed_frontier(df, group_by=["theta"]), frontier(df, group_by=["theta"]))
        pd.testing.assert_frame_equal(seed_frontier(df), frontier(df))
    # seeds that tell configurations apart (one each) are no replicates either
    assert not has_seed_replicates(_seeded([0]).assign(seed=range(4)))
