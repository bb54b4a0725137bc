"""Tidy frames from a real sweep, through MLflow and through the Ray Tune folder."""

import shutil

import pandas as pd

from analysis.results import concat_results, load_history, load_results


def test_mlflow_and_ray_folder_give_the_same_rows(grid_sweep):
    storage, _ = grid_sweep
    a = load_results("grid", storage, source="mlflow").sort_values(["theta", "kappa"]).reset_index(drop=True)
    b = load_results("grid", storage, source="ray").sort_values(["theta", "kappa"]).reset_index(drop=True)
    assert len(a) == len(b) == 6
    assert a["theta"].dtype.kind == "f" and a["augment"].dtype == bool and a["epochs"].dtype.kind == "i"
    assert a["status"].tolist() == b["status"].tolist()
    assert sorted(a["status"]) == ["completed"] * 4 + ["diverged"] * 2
    ok = a["status"] == "completed"
    pd.testing.assert_series_equal(a.loc[ok, "clean_acc"], b.loc[ok, "clean_acc"], check_names=False)
    pd.testing.assert_series_equal(a.loc[ok, "max_overlap_sq"], b.loc[ok, "max_overlap_sq"], check_names=False)
    assert (a["run_id"] == b["run_id"]).all() and a["trial_key"].is_unique


def test_the_direct_sqlite_read_equals_mlflows_client(grid_sweep, tmp_path):
    """The embedded store is read in one SQL query; MLflow's client must give the same runs, in the same
    order, with the same tags, params and latest metrics (NaN included)."""
    import math
    import sqlite3

    from analysis import schema

    storage, _ = grid_sweep
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    fast, slow = schema.sqlite_runs(uri, "grid"), schema.mlflow_runs(uri, "grid")
    assert fast is not None and len(fast) == len(slow) == 7  # 6 trials and the sweep's parent run
    assert [r.run_id for r in fast] == [r.run_id for r in slow]
    for a, b in zip(fast, slow, strict=True):
        assert a.tags == b.tags and a.params == b.params and a.metrics.keys() == b.metrics.keys()
        for k, v in a.metrics.items():
            assert v == b.metrics[k] or (math.isnan(v) and math.isnan(b.metrics[k])), k
    assert any(math.isnan(v) for r in fast for v in r.metrics.values())  # the diverged trials' NaN came through
    # what it cannot read, it leaves to MLflow's client: another store, no such experiment, a foreign file
    assert schema.sqlite_runs("http://127.0.0.1:1", "grid") is None
    assert schema.sqlite_runs(uri, "nosuch") is None
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.commit()
    assert schema.sqlite_runs(f"sqlite:///{foreign}", "grid") is None


def test_ray_folder_is_used_when_mlflow_is_gone(grid_sweep, tmp_path):
    storage, _ = grid_sweep
    copy = tmp_path / "copy"
    shutil.copytree(storage / "grid", copy / "grid")  # no mlflow.db beside it
    (copy / "grid" / "sweeper.json").unlink()
    df = load_results("grid", copy)
    assert len(df) == 6 and set(df["status"]) == {"completed", "diverged"}


def test_histories_and_several_sweeps(grid_sweep):
    storage, _ = grid_sweep
    h = load_history("grid", storage)
    assert set(h.columns) == {"sweep", "run_id", "trial_key", "epoch", "metric", "value"}
    assert set(h[h.metric == "clean_acc"]["epoch"]) == {1}
    assert not h.duplicated(["run_id", "epoch", "metric"]).any()
    # the one-query read of the embedded store gives MLflow's client's points, per run and metric
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")

    def nan_safe(points):  # NaN (a diverged epoch) never equals itself: compared as text
        return sorted((r, m, int(e), "nan" if v != v else v) for r, m, e, v in points)

    client_points = nan_safe(
        (r, m, p.step, p.value) for r in set(h["run_id"]) for m in set(h["metric"]) for p in c.get_metric_history(r, m)
    )
    assert nan_safe(h[["run_id", "metric", "epoch", "value"]].itertuples(index=False, name=None)) == client_points
    hr = load_history("grid", storage, source="ray")
    assert set(hr[hr.metric == "clean_acc"]["trial_key"]) == set(h[h.metric == "clean_acc"]["trial_key"])
    both = concat_results([load_results("grid", storage), load_results("grid", storage, source="ray")])
    assert len(both) == 12


def test_pending_rows_carry_the_config_they_will_run():
    """A pending trial in the report shows augment/epochs/seed like a finished one, not blanks."""
    from analysis.results import pending_rows
    from trainables.record import SweepMeta

    meta = SweepMeta(
        name="p",
        storage="/s",
        mlflow_uri="sqlite:////s/m.db",
        n_trials=1,
        spec={"axes": {"kappa": [0, 100]}, "fixed": {"epochs": 4}, "seeds": [0, 1], "kind": "network"},
        trials=[{"key": "k1", "point": {"kappa": 100, "seed": 1}}],
    )
    (row,) = pending_rows(meta)
    assert row["kappa"] == 100 and row["seed"] == 1 and row["epochs"] == 4  # axes < fixed < defaults
    assert row["augment"] is False and row["status"] == "pending" and row["trial_key"] == "k1"


def test_a_sweep_over_attack_fields_only_draws_one_frontier_not_one_per_trial():
    import pandas as pd

    from analysis.results import default_groups

    kernel = pd.DataFrame(
        {
            "kind": "kernel",
            "status": "completed",
            "m": [1, 2, 4, 1, 2, 4],
            "r": [0.05] * 3 + [0.5] * 3,
            "residual": 0.1,
            "delta_f": 0.2,
        }
    )
    assert default_groups(kernel) == []  # every (m, r) group would hold one trial
    net = pd.DataFrame({"status": "completed", "theta": [0.05, 0.05, 0.1, 0.1], "kappa": [0, 400, 0, 400]})
    assert default_groups(net) == ["theta"]  # kappa is the defender's: one frontier per theta


def test_a_running_trial_between_evaluations_keeps_its_last_scores(tmp_path):
    """The Ray folder's reader gives each metric's latest value, as MLflow does: a trial running with
    eval_every=2 whose last reported epoch was not evaluated still shows the scores of the one before."""
    import json

    from analysis.results import results_from_ray

    tdir = tmp_path / "evals" / "trial_00000"
    tdir.mkdir(parents=True)
    (tdir / "params.json").write_text(json.dumps({"trial": {"theta": 0.1, "eval_every": 2, "epochs": 6}}))
    lines = [
        {"epoch": 2, "train_loss": 0.9, "clean_acc": 0.8, "asr": 0.5, "status": "running", "trial_key": "k"},
        {"epoch": 3, "train_loss": 0.5, "status": "running", "trial_key": "k"},
    ]
    (tdir / "result.json").write_text("".join(json.dumps(r) + "\n" for r in lines))
    row = results_from_ray("evals", tmp_path).iloc[0]
    assert row["status"] == "running" and row["epoch"] == 3 and row["train_loss"] == 0.5
    assert row["clean_acc"] == 0.8 and row["asr"] == 0.5
