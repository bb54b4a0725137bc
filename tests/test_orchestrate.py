"""Sweeps on real Ray (local and a two-node ray.cluster_utils.Cluster) with real MLflow stores."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
import ray
from conftest import FAST
from mlflow.tracking import MlflowClient

from sweeper.cli import main
from sweeper.orchestrate import SweepOptions, resume_sweep, run_sweep
from sweeper.spaces import SweepSpec
from sweeper.states import sweep_status
from sweeper.tracking import default_uri
from trainables.record import TAG_KEY, TAG_KIND


def child_runs(uri: str, experiment: str):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'trial'", max_results=1000)


def test_grid_sweep_logs_one_child_run_per_trial_under_one_parent(grid_sweep):
    storage, report = grid_sweep
    assert report.counts == {"completed": 4, "diverged": 2, "failed": 0, "interrupted": 0, "pending": 0, "total": 6}
    uri = default_uri(storage)
    mlflow.set_tracking_uri(uri)
    df = mlflow.search_runs(experiment_names=["grid"])
    parents = df[df["tags.sweeper.kind"] == "sweep"]
    children = df[df["tags.sweeper.kind"] == "trial"]
    assert len(parents) == 1 and len(children) == 6
    assert set(children["tags.mlflow.parentRunId"]) == {parents["run_id"].iloc[0]}
    assert sorted(zip(children["params.theta"], children["params.kappa"], strict=True)) == [
        ("0.0", "0.0"),
        ("0.0", "100000000.0"),
        ("0.0", "50.0"),
        ("0.1", "0.0"),
        ("0.1", "100000000.0"),
        ("0.1", "50.0"),
    ]
    done = children[children["tags.sweeper.status"] == "completed"]
    assert len(done) == 4 and set(done["params.kappa"]) == {"0.0", "50.0"}
    for col in (
        "metrics.clean_acc",
        "metrics.asr",
        "metrics.lambda_1",
        "metrics.max_overlap_sq",
        "metrics.geom_d_ratio",
    ):
        assert done[col].notna().all(), col
    diverged = children[children["tags.sweeper.status"] == "diverged"]
    assert set(diverged["params.kappa"]) == {"100000000.0"}  # recorded, and the sweep went on
    assert (diverged["tags.sweeper.diverged_epoch"] == "1").all()
    assert children["tags.sweeper.git_commit"].notna().all()
    assert (children["tags.sweeper.ray_node"].str.len() == 56).all()  # the node each trial ran on, from its reports
    # Tune's JSON and CSV results, and no TensorBoard files: tensorboardX would import torch into the driver
    folders = list((storage / "grid").glob("trial_*"))
    assert len(folders) == 6 and all((f / "result.json").is_file() and (f / "progress.csv").is_file() for f in folders)
    assert not list((storage / "grid").glob("trial_*/events.out.tfevents*"))
    run_id = done["run_id"].iloc[0]
    arts = {a.path for a in MlflowClient(uri).list_artifacts(run_id)}
    assert {
        "eigenvectors.png",
        "spectrum.json",
        "geometry.csv",
        "trigger.png",
        "detection.json",
        "localisation.png",
    } <= arts
    assert done["metrics.det_lambda_trace_ratio"].notna().all() and (done["metrics.det_trace_exact"] == 1).all()
    st = sweep_status("grid", str(storage))
    assert (st["completed"], st["diverged"], st["pending"], st["total"]) == (4, 2, 0, 6)


def test_existing_sweep_is_never_overwritten(grid_sweep, no_ray, capsys):
    storage, _ = grid_sweep
    meta = (storage / "grid" / "sweeper.json").read_text()
    code = main(["run", "--storage", str(storage), "--name", "grid", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err and "sweeper resume grid" in err
    assert (storage / "grid" / "sweeper.json").read_text() == meta
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["run", "--theta", "2"], "theta=2.0 is invalid"),
        (["run", "--kappa", "log:0:1:3"], "--kappa='log:0:1:3' is invalid"),
        (["run", "--name", "bad/name"], "--name 'bad/name' is invalid"),
        (["run", "--cpus-per-trial", "0"], "--cpus-per-trial=0.0 is invalid"),
        (["run", "--address", "127.0.0.1:1"], "nothing answers at 127.0.0.1:1"),
        (["run", "--address", "not an address"], "--address 'not an address' is invalid"),
        (["run", "--mlflow-uri", "http://127.0.0.1:1"], "is unreachable"),
        (["run", "--mlflow-uri", "mysql://x"], "--mlflow-uri 'mysql://x' is invalid"),
        (["run", "--set", "lr"], "expected FIELD=VALUE"),
        (["run", "--set", "bogus=1"], "not a network-trial field"),
        (["resume", "nosuchsweep"], "no sweep 'nosuchsweep'"),
        (["status", "nosuchsweep"], "no sweep 'nosuchsweep'"),
    ],
)
def test_bad_sweep_input_exits_2_before_ray_starts(argv, needle, tmp_path, capsys, no_ray):
    code = main(argv + ["--storage", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not ray.is_initialized()
    assert not any((tmp_path / "s").glob("*/sweeper.json"))


def test_plan_prints_grid_and_cost(capsys, no_ray):
    code = main(["plan", "--theta", "0:0.02:0.01", "--kappa", "log:1e2:1e4:3", "--augment", "both", "--seeds", "2"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("36 trials") and "cost on CPU" in out and "rough model" in out
    assert not ray.is_initialized()


def test_two_node_cluster_places_trials_on_both_nodes(tmp_path, no_ray):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        spec = SweepSpec(axes={"kappa": [0.0, 10.0, 20.0, 30.0]}, fixed={**FAST, "epochs": 2})
        report = run_sweep(spec, SweepOptions(name="twonode", storage=str(tmp_path), verbose=0))
        assert report.counts["completed"] == 4
        assert len({r["node_id"] for r in report.rows}) == 2
        assert len(child_runs(default_uri(tmp_path), "twonode")) == 4
    finally:
        ray.shutdown()
        cluster.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_server_on_loopback_receives_the_runs(tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # as the README's tracking server
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "mlflow server did not start"
            assert server.poll() is None, "mlflow server exited"
            time.sleep(1)
        spec = SweepSpec(axes={"kappa": [0.0, 10.0]}, fixed=FAST)
        report = run_sweep(spec, SweepOptions(name="served", storage=str(tmp_path / "s"), mlflow_uri=uri, verbose=0))
        assert report.counts["completed"] == 2
        runs = child_runs(uri, "served")
        assert len(runs) == 2 and all("clean_acc" in r.data.metrics for r in runs)
        assert MlflowClient(uri).list_artifacts(runs[0].info.run_id)  # artifacts went through the server
        assert not (tmp_path / "s" / "mlflow.db").exists()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_driver_killed_mid_sweep_resumes_without_rerun_or_duplicates(tmp_path):
    storage = tmp_path / "s"
    uri = default_uri(storage)
    epochs = 5
    cmd = [
        sys.executable,
        "-m",
        "sweeper.cli",
        "run",
        "--storage",
        str(storage),
        "--name",
        "killed",
        "--theta",
        "0.1",
        "--kappa",
        "0",  # four seeds, not four kappas: a penalised epoch costs 2-3x (the double backward), beside the point here
        "--seeds",
        "4",
        "--epochs",
        str(epochs),
        "--max-concurrent",
        "1",
        "--set",
        "hessian_samples=100",
        "--set",
        "hessian_iterations=6",
        "--set",
        "hessian_top_k=3",
        "--set",
        "geometry=false",
    ]
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    try:
        while True:  # kill once one trial has finished and another is part-way
            assert proc.poll() is None, (
                "the sweep ended before it could be killed:\n" + (tmp_path / "driver.log").read_text()[-3000:]
            )
            assert time.time() < deadline, "no progress to interrupt"
            if (storage / "killed" / "sweeper.json").exists():  # the driver has set up the store
                try:
                    runs = child_runs(uri, "killed")
                except Exception:
                    runs = []
                done = [r for r in runs if r.data.tags.get("sweeper.status") == "completed"]
                if done and len(runs) >= 2:
                    break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait(timeout=60)
        log.close()
    killed_at = time.time() * 1000
    before = {r.data.tags[TAG_KEY]: r for r in child_runs(uri, "killed")}
    finished_before = {k for k, r in before.items() if r.data.tags.get("sweeper.status") == "completed"}
    assert finished_before and len(finished_before) < 4
    time.sleep(1)

    report = resume_sweep("killed", str(storage))
    assert report.counts["completed"] == 4, report.rows
    runs = child_runs(uri, "killed")
    keys = [r.data.tags[TAG_KEY] for r in runs]
    assert len(runs) == 4 and len(set(keys)) == 4  # exactly one MLflow run per trial
    c = MlflowClient(uri)
    for r in runs:
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(1, epochs + 1)), steps  # every epoch once, none twice
        assert r.data.tags["sweeper.status"] == "completed"
        if r.data.tags[TAG_KEY] in finished_before:  # finished before the kill: nothing re-run or re-logged
            hist = c.get_metric_history(r.info.run_id, "clean_acc")
            assert max(m.timestamp for m in hist) < killed_at
    st = sweep_status("killed", str(storage))
    assert (st["completed"], st["running"], st["pending"]) == (4, 0, 0)


def test_live_progress_bar_counts_trials_and_prints_one_line_per_finished_trial(tmp_path, capsys):
    spec = SweepSpec(axes={"kappa": [0.0, 10.0]}, fixed={**FAST, "geometry": False})
    report = run_sweep(spec, SweepOptions(name="live", storage=str(tmp_path), live=True))
    out = capsys.readouterr().out
    assert report.counts["completed"] == 2
    assert "trials" in out and "2/2" in out  # the bar's final state
    assert sum(" completed: clean=" in line for line in out.splitlines()) == 2  # a line per finished trial
    assert "epoch 1/1" not in out  # no per-epoch flood
