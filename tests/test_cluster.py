"""A cluster started the way a user starts one — `ray start --head` / `ray start --address` processes on
127.0.0.1 with token authentication — then `sweeper run --address`; a worker node lost mid-trial; an
MLflow server with its basic-auth app. Every process is bounded in time and killed on the way out."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import ray

from analysis.schema import client, read_meta

RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
MLFLOW = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
SWEEP = [
    sys.executable,
    "-m",
    "sweeper.cli",
    "run",
    "--theta",
    "0.1",
    "--set",
    "hessian=false",
    "--set",
    "geometry=false",
    "--quiet",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, token: Path | None, **extra) -> dict[str, str]:
    """A clean environment: its own HOME (no ~/.ray/auth_token of this machine), the token if given.

    Every process started with it (nodes, their workers, drivers) carries TAG=HOME, which is how the
    teardown finds exactly this test's processes and no other Ray on the machine.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "MLFLOW_TRACKING"))}
    env["HOME"] = str(home)
    env[TAG] = str(home)
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    env.update(extra)
    return env


TAG = "SWEEPER_TEST_CLUSTER"


def _kill_tagged(groups: list[subprocess.Popen], home: Path) -> None:
    """Kill the process groups this test started, then any process left whose environment has TAG=home.

    Never `ray stop --force`: that kills every Ray process of the user on the machine (a parallel test
    run's, a developer's), not just this test's cluster.
    """
    for proc in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    needle = f"\0{TAG}={home}\0".encode()
    proc_fs = Path("/proc")
    for _ in range(3):  # a process forked while we looked is caught by the next pass
        found = []
        for d in proc_fs.iterdir() if proc_fs.is_dir() else ():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    environ = (d / "environ").read_bytes()
                except OSError:
                    continue
                if needle in b"\0" + environ + b"\0":
                    found.append(int(d.name))
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if not found:
            break
        time.sleep(0.5)
    for proc in groups:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


@pytest.fixture
def token_cluster(tmp_path):
    """A head (1 CPU) started with `ray start --head --block` in token mode; yields (address, token, home,
    add_worker). Each node is its own process group in its own Ray temp dir; all are killed on the way out,
    also when the head fails to start."""
    if ray.is_initialized():
        ray.shutdown()
    home = tmp_path / "home"
    home.mkdir()
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = _env(home, token)
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    started: list[subprocess.Popen] = []

    def start(args: list[str], wrap: tuple[str, ...] = ()) -> subprocess.Popen:
        # --block keeps the node's processes under this one process group: killing it loses the node
        with open(tmp_path / f"node{len(started)}.log", "wb") as log:  # the node keeps its own descriptor
            proc = subprocess.Popen(
                [*wrap, RAY, "start", *args, "--temp-dir", str(temp), "--block", "--disable-usage-stats"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(proc)
        return proc

    def add_worker(wrap: tuple[str, ...] = ()) -> subprocess.Popen:
        return start(["--address", address, "--num-cpus", "1"], wrap)

    try:
        head = start(
            [
                "--head",
                "--port",
                str(port),
                "--num-cpus",
                "1",
                "--include-dashboard",
                "false",
                "--dashboard-port",
                str(_free_port()),
            ]
        )
        _wait_nodes(address, token, home, 1, head=head, log=tmp_path / "node0.log")
        yield address, token, home, add_worker
    finally:
        _kill_tagged(started, home)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_nodes(
    address: str,
    token: Path,
    home: Path,
    n: int,
    timeout: float = 90.0,
    head: subprocess.Popen | None = None,
    log: Path | None = None,
) -> None:
    # one driver that waits, not one per poll: joining a cluster costs ~0.75 CPU-s (31 joins were 23 CPU-s of the suite)
    probe = (
        "import ray, sys, time; ray.init(address=sys.argv[1], include_dashboard=False, logging_level='ERROR')\n"
        "alive = lambda: sum(1 for x in ray.nodes() if x['Alive'])\n"
        "end = time.monotonic() + float(sys.argv[3])\n"
        "while alive() < int(sys.argv[2]) and time.monotonic() < end: time.sleep(0.25)\n"
        "print(alive())"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head is not None and head.poll() is not None:
            raise AssertionError(
                f"`ray start --head` exited with {head.returncode}: {log.read_text()[-2000:] if log else ''}"
            )
        if head is not None:  # nothing to ask before the GCS port answers
            host, port = address.rsplit(":", 1)
            with socket.socket() as s:
                if s.connect_ex((host, int(port))) != 0:
                    time.sleep(0.5)
                    continue
        wait = max(1.0, min(30.0, deadline - time.monotonic()))
        out = subprocess.run(
            [sys.executable, "-c", probe, address, str(n), str(wait)],
            env=_env(home, token),
            capture_output=True,
            text=True,
            timeout=60 + wait,
        )
        if out.stdout.strip().isdigit() and int(out.stdout.strip()) >= n:
            return
        time.sleep(1)
    raise AssertionError(f"fewer than {n} nodes joined {address}")


def _lines(proc: subprocess.Popen) -> queue.Queue:
    """proc's stdout lines, read by a thread (None at the end), so a reader can wait with a deadline."""
    q: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _results(tdir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (tdir / "result.json").read_text().splitlines() if ln.strip()]


def _last_results(folder: Path) -> list[dict]:
    return [_results(tdir)[-1] for tdir in sorted(folder.glob("trial_*"))]


def test_a_token_cluster_takes_a_sweep_on_both_nodes_and_refuses_a_driver_without_its_token(token_cluster, tmp_path):
    address, token, home, add_worker = token_cluster
    add_worker()
    _wait_nodes(address, token, home, 2)
    storage = tmp_path / "sweeps"

    # no token on this "machine": one line, exit 2, nothing written
    r = subprocess.run(
        SWEEP + ["--kappa", "0,10", "--epochs", "1", "--address", address, "--name", "n", "--storage", str(storage)],
        env=_env(home, None),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("sweeper: error: --address") and "requires an auth token" in last and "RAY_AUTH_TOKEN" in last
    )
    assert read_meta(str(storage), "n") is None and not (storage / "n").exists()
    search = [
        sys.executable,
        "-m",
        "sweeper.cli",
        "search",
        "--budget",
        "1",
        "--epochs",
        "1",
        "--quiet",
        "--address",
        address,
        "--name",
        "s",
        "--storage",
        str(storage),
    ]
    r = subprocess.run(search, env=_env(home, None), capture_output=True, text=True, timeout=180)
    assert r.returncode == 2 and "requires an auth token" in r.stderr.strip().splitlines()[-1], r.stderr
    assert not (storage / "s").exists()

    # a wrong token: refused by name
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    r = subprocess.run(
        SWEEP + ["--kappa", "0,10", "--epochs", "1", "--address", address, "--name", "w", "--storage", str(storage)],
        env=_env(home, wrong),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 2 and f"refused the auth token from {wrong}" in r.stderr, r.stderr

    # the head's token: the sweep runs, one trial per node (1 CPU each)
    env = _env(home, None, RAY_AUTH_TOKEN=token.read_text())
    r = subprocess.run(
        SWEEP + ["--kappa", "0,10", "--epochs", "2", "--address", address, "--name", "ok", "--storage", str(storage)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0 and "2 completed" in r.stdout, r.stdout + r.stderr
    nodes = {res["node_id"] for res in _last_results(storage / "ok")}
    assert len(nodes) == 2, nodes
    assert not list(storage.glob(".sweeper-*"))  # the shared-storage check passed and left nothing behind

    # resuming it from a machine without the token: the same line, before the sweep's record changes
    before = (storage / "ok" / "sweeper.json").read_bytes()
    r = subprocess.run(
        [sys.executable, "-m", "sweeper.cli", "resume", "ok", "--storage", str(storage), "--address", address],
        env=_env(home, None),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 2 and "requires an auth token" in r.stderr.strip().splitlines()[-1], r.stderr
    assert (storage / "ok" / "sweeper.json").read_bytes() == before


def _unshare_reason() -> str | None:
    """Why a node cannot get its own mount namespace here (None: it can)."""
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("unshare"):
        return "needs Linux, root and unshare(1) to give a node its own mount namespace"
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(
            [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                'mount -t tmpfs sweeper-test "$0" && touch "$0/x"',
                d,
            ],
            capture_output=True,
            timeout=30,
        )
        if r.returncode != 0 or (Path(d) / "x").exists():
            return f"unshare -m / mount -t tmpfs do not work here: {r.stderr.decode(errors='replace').strip()}"
    return None


def test_a_storage_folder_that_a_worker_node_does_not_see_stops_the_sweep_before_any_trial(token_cluster, tmp_path):
    """A worker whose --storage folder is its own (a tmpfs over the path, in the worker's mount namespace:
    the head's local folder on a real cluster) is named in one line, exit 2, before a trial starts."""
    reason = _unshare_reason()
    if reason:
        pytest.skip(reason)
    address, token, home, add_worker = token_cluster
    storage = tmp_path / "sweeps"
    storage.mkdir()
    add_worker(
        wrap=(
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs sweeper-test "$0" && exec "$@"',
            str(storage),
        )
    )
    _wait_nodes(address, token, home, 2)
    r = subprocess.run(
        SWEEP
        + ["--kappa", "0,10", "--epochs", "1", "--address", address, "--name", "local", "--storage", str(storage)],
        env=_env(home, token),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sweeper: error: --storage {storage} is not shared by every node"), last
    assert re.search(r": node \S+ \(id [0-9a-f]{12}\) does not see it; use an s3://", last), last
    assert not (storage / "local").exists() and not list(storage.glob(".sweeper-*"))  # nothing written, no marker


def test_losing_a_worker_node_mid_trial_the_sweep_finishes_on_the_head_without_duplicates(token_cluster, tmp_path):
    address, token, home, add_worker = token_cluster
    worker = add_worker()
    _wait_nodes(address, token, home, 2)
    storage = tmp_path / "sweeps"
    argv = SWEEP + [
        "--kappa",
        "20,30",
        "--epochs",
        "12",
        "--address",
        address,
        "--name",
        "loss",
        "--storage",
        str(storage),
        "--max-failures",
        "3",
    ]
    argv.remove("--quiet")  # the per-epoch lines tell when both trials are training
    proc = subprocess.Popen(
        argv, env=_env(home, token), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines, training, deadline = [], set(), time.monotonic() + 300
    try:
        out = _lines(proc)
        while len(training) < 2:  # both trials past their first checkpoint: one of them is on the worker
            try:
                line = out.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("no two trials training within 300 s:\n" + "".join(lines)) from None
            assert line is not None, "the sweep ended before both trials trained:\n" + "".join(lines)
            lines.append(line)
            if " epoch 2/12 " in line:
                training.add(line.split("] ", 1)[1].split()[0])
        os.killpg(worker.pid, signal.SIGKILL)  # the worker node is gone, with the trial running on it
        proc.wait(timeout=600)
        end = time.monotonic() + 30  # the rest of the output (the reader stops at end of file)
        with contextlib.suppress(queue.Empty):
            while (line := out.get(timeout=max(0.0, end - time.monotonic()))) is not None:
                lines.append(line)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines)
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

    # Ray's own record of the lost trial: it restarted once (iterations_since_restore back to 1) and went on
    # from its last checkpoint, not from epoch 1 (MLflow alone cannot tell: log_epoch skips logged epochs)
    restored = {}
    for tdir in sorted((storage / "loss").glob("trial_*")):
        rows = _results(tdir)
        restarts = [i for i, r in enumerate(rows) if i > 0 and r["iterations_since_restore"] == 1]
        if restarts:
            restored[tdir.name] = (rows, restarts)
    assert len(restored) == 1, sorted(restored)  # the trial on the lost worker, and only it
    ((rows, restarts),) = restored.values()
    assert len(restarts) == 1, [(r["epoch"], r["iterations_since_restore"]) for r in rows]
    before, after = rows[restarts[0] - 1], rows[restarts[0]]
    assert after["epoch"] == before["epoch"] + 1 > 2, (before, after)  # the epoch after its last checkpoint
    assert after["training_iteration"] == before["training_iteration"] + 1
    assert after["pid"] != before["pid"]
    epochs = [r["epoch"] for r in rows if r.get("status") == "running"]
    assert epochs == list(range(1, 12)), epochs  # every running report once: nothing re-trained


@pytest.fixture
def auth_server(tmp_path):
    """`mlflow server --app-name basic-auth` on 127.0.0.1 with an admin password from the environment."""
    port = _free_port()
    ini = tmp_path / "auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret-password-42",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # as cluster.yaml's server
    }
    proc = subprocess.Popen(
        [
            MLFLOW,
            "server",
            "--app-name",
            "basic-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
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


def test_an_authenticated_mlflow_server_takes_the_right_credentials_and_refuses_wrong_ones(
    auth_server, tmp_path, monkeypatch
):
    pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (pip install -e '.[test]')")
    storage = tmp_path / "sweeps"
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    argv = SWEEP + ["--kappa", "0", "--epochs", "1", "--mlflow-uri", auth_server, "--storage", str(storage)]
    for env, needle in (
        ({}, "requires authentication"),
        (
            {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "nope"},
            "refused the credentials of MLFLOW_TRACKING_USERNAME='admin'",
        ),
    ):
        t0 = time.monotonic()
        r = subprocess.run(argv + ["--name", "bad"], env={**base, **env}, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Ray" not in r.stderr and time.monotonic() - t0 < 60  # before Ray starts
        assert not (storage / "bad").exists()
    # the README's way: the admin creates a non-admin user for sweeps (MLflow's basic-auth client), which logs
    import mlflow.server

    with monkeypatch.context() as m:  # in this process: a Python start costs seconds of imports
        m.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        m.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-password-42")
        mlflow.server.get_app_client("basic-auth", tracking_uri=auth_server).create_user("sweeps", "pw-of-sweeps")
    sweeps = {**base, "MLFLOW_TRACKING_USERNAME": "sweeps", "MLFLOW_TRACKING_PASSWORD": "pw-of-sweeps"}
    r = subprocess.run(argv + ["--name", "good"], env=sweeps, capture_output=True, text=True, timeout=600)
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

    # browsing from a machine without the sweep's folder (the README's laptop): the runs table's direct link
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sweeper.cli",
            "ui",
            "good",
            "--mlflow-uri",
            auth_server,
            "--storage",
            str(tmp_path / "laptop"),
        ],
        env=sweeps,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert f"runs: {auth_server}/#/experiments/{exp.experiment_id}/runs" in r.stdout.splitlines(), r.stdout
