"""The text summary a sweep run prints: its frontier averages seeds, a seedless sweep's is unchanged."""

from test_plots import population  # the synthetic detection population the figure tests draw


def test_sweep_summary_frontier_averages_seeds_and_leaves_a_seedless_sweep_alone():
    from analysis.frontier import sweep_summary
    from analysis.pareto import frontier

    df = population(thetas=(0.05,), seeds=3).assign(kind="network")
    text = sweep_summary(df, ["kappa", "seed"])
    front = text.split("frontier (")[1].splitlines()
    assert "n_seeds" in front[1] and "clean_acc_std" in front[1] and len(front) == 2 + 2  # kappa 0 and 400
    one = population(thetas=(0.05,), seeds=1).assign(kind="network")
    text = sweep_summary(one, ["kappa"])
    cols = ["kappa", "status", "clean_acc", "asr", "max_overlap_sq"]  # what the frontier printed before seeds
    plain = frontier(one)[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")
    assert text.split("(maximize clean_acc, minimize asr):\n")[1] == plain
