"""A cluster started the way a user starts one — `ray start --head` / `ray start --address` processes on
127.0.0.1 with token authentication — then `sweeper run --address`; a worker node lost mid-trial; an
MLflow server with its basic-auth app. Every process is bounded in time and killed on the way out."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import ray

from analysis.schema import client, read_meta

RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
MLFLOW = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
SWEEP = [sys.executable, "-m", "sweeper.cli", "run", "--theta", "0.1", "--set", "hessian=false",
         "--set", "geometry=false", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, token: Path | None, **extra) -> dict[str, str]:
    """A clean environment: its own HOME (no ~/.ray/auth_token of this machine), the token if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "MLFLOW_TRACKING"))}
    env["HOME"] = str(home)
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    env.update(extra)
    return env


@pytest.fixture
def token_cluster(tmp_path):
    """A head (1 CPU) started with `ray start --head` in token mode; yields (address, token, home, add_worker)."""
    if ray.is_initialized():
        ray.shutdown()
    home = tmp_path / "home"
    home.mkdir()
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    port = _free_port()
    env = _env(home, token)
    started: list[subprocess.Popen] = []
    subprocess.run([RAY, "start", "--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard", "false",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)

    def add_worker() -> subprocess.Popen:
        # --block keeps the node's processes under this one process group: killing it loses the node
        proc = subprocess.Popen([RAY, "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1", "--block",
                                 "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        started.append(proc)
        return proc

    try:
        yield f"127.0.0.1:{port}", token, home, add_worker
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _wait_nodes(address: str, token: Path, home: Path, n: int, timeout: float = 90.0) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], include_dashboard=False, logging_level='ERROR'); "
             "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", probe, address], env=_env(home, token), capture_output=True,
                             text=True, timeout=60)
        if out.stdout.strip().isdigit() and int(out.stdout.strip()) >= n:
            return
        time.sleep(1)
    raise AssertionError(f"fewer than {n} nodes joined {address}")


def _last_results(folder: Path) -> list[dict]:
    out = []
    for tdir in sorted(folder.glob("trial_*")):
        lines = [json.loads(ln) for ln in (tdir / "result.json").read_text().splitlines() if ln.strip()]
        out.append(lines[-1])
    return out


def test_a_token_cluster_takes_a_sweep_on_both_nodes_and_refuses_a_driver_without_its_token(token_cluster, tmp_path):
    address, token, home, add_worker = token_cluster
    add_worker()
    _wait_nodes(address, token, home, 2)
    storage = tmp_path / "sweeps"

    # no token on this "machine": one line, exit 2, nothing written
    r = subprocess.run(SWEEP + ["--kappa", "0,10", "--epochs", "1", "--address", address, "--name", "n",
                                "--storage", str(storage)], env=_env(home, None), capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("sweeper: error: --address") and "requires an auth token" in last and "RAY_AUTH_TOKEN" in last
    assert read_meta(str(storage), "n") is None and not (storage / "n").exists()

    # a wrong token: refused by name
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    r = subprocess.run(SWEEP + ["--kappa", "0,10", "--epochs", "1", "--address", address, "--name", "w",
                                "--storage", str(storage)], env=_env(home, wrong), capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 2 and f"refused the auth token from {wrong}" in r.stderr, r.stderr

    # the head's token: the sweep runs, one trial per node (1 CPU each)
    env = _env(home, None, RAY_AUTH_TOKEN=token.read_text())
    r = subprocess.run(SWEEP + ["--kappa", "0,10", "--epochs", "2", "--address", address, "--name", "ok",
                                "--storage", str(storage)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "2 completed" in r.stdout, r.stdout + r.stderr
    nodes = {res["node_id"] for res in _last_results(storage / "ok")}
    assert len(nodes) == 2, nodes


def test_losing_a_worker_node_mid_trial_the_sweep_finishes_on_the_head_without_duplicates(token_cluster, tmp_path):
    address, token, home, add_worker = token_cluster
    worker = add_worker()
    _wait_nodes(address, token, home, 2)
    storage = tmp_path / "sweeps"
    argv = SWEEP + ["--kappa", "20,30", "--epochs", "12", "--address", address, "--name", "loss",
                    "--storage", str(storage), "--max-failures", "3"]
    argv.remove("--quiet")  # the per-epoch lines tell when both trials are training
    proc = subprocess.Popen(argv, env=_env(home, token), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, training, deadline = [], set(), time.monotonic() + 300
    try:
        for line in proc.stdout:
            lines.append(line)
            if " epoch 2/12 " in line:
                training.add(line.split("] ", 1)[1].split()[0])
            if len(training) == 2:  # both trials past their first checkpoint: one of them is on the worker
                break
            assert time.monotonic() < deadline, "".join(lines)
        os.killpg(worker.pid, signal.SIGKILL)  # the worker node is gone, with the trial running on it
        rest, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines) + rest
    assert proc.returncode == 0, text
    assert "2 completed, 0 diverged, 0 failed" in text, text
    meta = read_meta(str(storage), "loss")
    c = client(meta.mlflow_uri)
    runs = c.search_runs([meta.experiment_id], filter_string="tags.`sweeper.kind` = 'trial'")
    assert len(runs) == 2  # the lost trial kept its run
    assert len({res["node_id"] for res in _last_results(storage / "loss")}) == 1  # both ended on the surviving head
    for run in runs:
        steps = [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(1, 13)), steps  # every epoch exactly once, across the node loss


@pytest.fixture
def auth_server(tmp_path):
    """`mlflow server --app-name basic-auth` on 127.0.0.1 with an admin password from the environment."""
    port = _free_port()
    ini = tmp_path / "auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret-password-42",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    proc = subprocess.Popen([MLFLOW, "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                             "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_an_authenticated_mlflow_server_takes_the_right_credentials_and_refuses_wrong_ones(auth_server, tmp_path):
    pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (pip install -e '.[test]')")
    storage = tmp_path / "sweeps"
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    argv = SWEEP + ["--kappa", "0", "--epochs", "1", "--mlflow-uri", auth_server, "--storage", str(storage)]
    for env, needle in (({}, "requires authentication"),
                        ({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "nope"},
                         "refused the credentials of MLFLOW_TRACKING_USERNAME='admin'")):
        t0 = time.monotonic()
        r = subprocess.run(argv + ["--name", "bad"], env={**base, **env}, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Ray" not in r.stderr and time.monotonic() - t0 < 60  # before Ray starts
        assert not (storage / "bad").exists()
    good = {**base, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "s3cret-password-42"}
    r = subprocess.run(argv + ["--name", "good"], env=good, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "1 completed" in r.stdout, r.stdout + r.stderr
    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="s3cret-password-42")
    try:
        c = client(auth_server)
        exp = c.get_experiment_by_name("good")
        runs = c.search_runs([exp.experiment_id], filter_string="tags.`sweeper.kind` = 'trial'")
        assert len(runs) == 1 and runs[0].data.tags["sweeper.status"] == "completed"
        assert {a.path for a in c.list_artifacts(runs[0].info.run_id)} >= {"history.json"}  # served by the server
    finally:
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(k, None)
