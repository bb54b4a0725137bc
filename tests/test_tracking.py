"""MLflow tracking helpers against real stores (no mocks)."""

import time

import pytest
from mlflow.tracking import MlflowClient

from sweeper import tracking
from trainables.config import SweeperError
from trainables.training.trial_result import TrialResult


def test_retry_recovers_from_transient_failures_and_gives_up_quietly():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("database is locked")
        return "ok"

    assert tracking.retry(flaky, "test", attempts=4, delay=0.01) == "ok" and len(calls) == 3
    assert tracking.retry(lambda: 1 / 0, "test", attempts=2, delay=0.01) is None  # warned, not raised
    with pytest.raises(ZeroDivisionError):
        tracking.retry(lambda: 1 / 0, "test", attempts=2, delay=0.01, fatal=True)


def test_a_dead_tracking_server_never_fails_the_trial(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    t0 = time.time()
    tracker = tracking.TrialTracker("http://127.0.0.1:1", "0", "parent", "s", {"theta": 0.1}, "t1")
    assert tracker.run_id is None
    tracker.log_epoch({"epoch": 1, "train_loss": 1.0})
    tracker.log_final(TrialResult(config={}, status="completed", metrics={"clean_acc": 1.0}))
    assert time.time() - t0 < 60


def test_check_uri_and_trial_run_reuse(tmp_path):
    uri = tracking.default_uri(tmp_path)
    tracking.check_uri(uri)
    with pytest.raises(SweeperError, match="is unreachable"):
        tracking.check_uri("http://127.0.0.1:1", timeout=1)
    exp = tracking.ensure_experiment(uri, "s", tmp_path / "art")
    assert tracking.ensure_experiment(uri, "s", tmp_path / "art") == exp  # idempotent
    parent = tracking.start_parent(uri, exp, "s", {"n_trials": 1})
    cfg = {"theta": 0.1, "kappa": 0.0}
    a = tracking.TrialTracker(uri, exp, parent, "s", cfg, "trial-a")
    a.log_epoch({"epoch": 1, "train_loss": 2.0})
    a.log_epoch({"epoch": 2, "train_loss": 1.5})
    b = tracking.TrialTracker(uri, exp, parent, "s", cfg, "trial-a-retry")  # a restart of the same trial
    assert b.run_id == a.run_id and b.logged_step == 2
    b.log_epoch({"epoch": 2, "train_loss": 1.5})  # already there: skipped
    b.log_epoch({"epoch": 3, "train_loss": 1.0})
    steps = [m.step for m in MlflowClient(uri).get_metric_history(a.run_id, "train_loss")]
    assert sorted(steps) == [1, 2, 3]
    other = tracking.TrialTracker(uri, exp, parent, "s", {**cfg, "kappa": 1.0}, "trial-b")
    assert other.run_id != a.run_id and other.key != a.key


def test_status_fast_path_reads_the_same_states_as_mlflows_client(grid_sweep):
    from analysis.schema import read_meta, trial_statuses, trial_statuses_mlflow

    storage, _ = grid_sweep
    meta = read_meta(str(storage), "grid")
    fast, ref = (
        trial_statuses(meta.mlflow_uri, meta.experiment_id),
        trial_statuses_mlflow(meta.mlflow_uri, meta.experiment_id),
    )
    assert fast == ref and len(fast) == 6 and sorted(fast.values()).count("completed") == 4
    # the comparison can fail: another experiment's states are not these
    assert trial_statuses(meta.mlflow_uri, "0") != ref


def test_closing_a_run_logs_the_epochs_it_lacks_once_then_the_final(tmp_path):
    """The driver closes a run from a trial's final checkpoint: epochs a killed driver never logged are filled
    in from the history, epochs already there are not logged twice, and the final metrics that are no epoch's
    land at the last epoch's step."""
    uri = tracking.default_uri(tmp_path)
    exp = tracking.ensure_experiment(uri, "s", tmp_path / "art")
    parent = tracking.start_parent(uri, exp, "s", {"n_trials": 1})
    cfg = {"theta": 0.1}
    tracking.TrialTracker(uri, exp, parent, "s", cfg, "t1").log_epoch({"epoch": 1, "train_loss": 2.0, "clean_acc": 0.5})
    history = [{"epoch": e, "train_loss": 3.0 - e, "clean_acc": 0.5 + e / 10} for e in (1, 2, 3)]
    art = tmp_path / "spectrum.json"
    art.write_text("{}")
    restarted = tracking.TrialTracker(uri, exp, parent, "s", cfg, "t1", node="")  # a new driver, after a resume
    restarted.close({**history[-1], "lambda_1": 7.0}, history, "completed", None, [art])
    c = MlflowClient(uri)
    points = sorted((m.step, m.value) for m in c.get_metric_history(restarted.run_id, "train_loss"))
    assert points == [(1, 2.0), (2, 1.0), (3, 0.0)]  # epoch 1 as first logged, once
    assert [(m.step, m.value) for m in c.get_metric_history(restarted.run_id, "lambda_1")] == [(3, 7.0)]
    run = c.get_run(restarted.run_id)
    assert run.data.tags["sweeper.status"] == "completed" and run.info.status == "FINISHED"
    assert [a.path for a in c.list_artifacts(restarted.run_id)] == ["spectrum.json"]
    again = tracking.TrialTracker(uri, exp, parent, "s", cfg, "t1")
    assert again.finished and again.final_metrics["lambda_1"] == 7.0


def _schema(db) -> tuple:
    """A SQLite store as MLflow left it: its tables' and indexes' SQL, its migration, its experiments (but the
    times they were made). Each statement's lines are compared as a set: MLflow's batch migrations write a
    table's constraints in an order that changes from process to process (Python's string hashing)."""
    import sqlite3
    from contextlib import closing

    def lines(sql: str | None) -> tuple[str, ...]:
        return tuple(sorted(ln.strip().rstrip(",") for ln in (sql or "").splitlines()))

    with closing(sqlite3.connect(db)) as con:
        return (
            sorted(
                (kind, name, lines(sql))
                for kind, name, sql in con.execute(
                    "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
                )
            ),
            con.execute("SELECT * FROM alembic_version").fetchall(),
            con.execute("SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments").fetchall(),
        )


def test_a_new_store_is_a_copy_of_the_empty_one_and_equals_the_store_mlflow_builds(tmp_path, monkeypatch):
    """A new embedded store is copied from an empty one built once per MLflow version (its migrations cost
    ~0.9 CPU-s a store): the copy has MLflow's own schema, migration and Default experiment, and an existing
    store is never replaced."""
    from analysis.schema import client

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a template of this test's own
    monkeypatch.chdir(tmp_path)  # the Default experiment's artifact location follows the working directory
    (tmp_path / "own").mkdir()
    client(f"sqlite:///{tmp_path / 'own' / 'mlflow.db'}").search_experiments()  # MLflow builds it itself
    for name in ("first", "second"):  # the first builds the template, the second only copies it
        (tmp_path / name).mkdir()
        tracking.create_store(tracking.default_uri(tmp_path / name))
        copy, own = _schema(tmp_path / name / "mlflow.db"), _schema(tmp_path / "own" / "mlflow.db")
        assert copy == own, (name, set(copy[0]) ^ set(own[0]), copy[1:], own[1:])
    assert tracking.empty_store_template().is_file() and str(tmp_path / "home") in str(tracking.empty_store_template())
    uri = tracking.default_uri(tmp_path / "second")
    exp = tracking.ensure_experiment(uri, "kept", None)
    tracking.create_store(uri)  # an existing store: left as it is
    assert client(uri).get_experiment(exp).name == "kept"
    import sqlite3

    with sqlite3.connect(tmp_path / "first" / "mlflow.db") as con:  # the comparison sees a missing index
        con.execute(
            "DROP INDEX " + next(r[1] for r in _schema(tmp_path / "first" / "mlflow.db")[0] if r[0] == "index" and r[2])
        )
    assert _schema(tmp_path / "first" / "mlflow.db") != _schema(tmp_path / "own" / "mlflow.db")
