"""``sweeper ui``: the MLflow UI on a sweep's store, its links, and a clean stop on Ctrl-C, SIGTERM and SIGHUP."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from analysis.schema import read_meta
from sweeper.cli import main
from sweeper.ui import browse_lines, ui_links
from tests.processes import descendants, live, proc_cmdline, proc_stat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_links_open_the_runs_table_not_the_genai_overview():
    links = ui_links("http://127.0.0.1:5000/", "7", "abc")
    assert links["runs"] == "http://127.0.0.1:5000/#/experiments/7/runs"
    assert links["parent"] == "http://127.0.0.1:5000/#/experiments/7/runs/abc"


def test_run_ends_with_a_tracking_servers_direct_links_else_the_ui_command():
    """`sweeper run` / `resume` end with these lines (sweeper.cli.sweeps._report)."""
    assert browse_lines("s", "/st", "http://mlflow.lab:5000/", "7", "abc") == [
        "runs: http://mlflow.lab:5000/#/experiments/7/runs",
        "parent: http://mlflow.lab:5000/#/experiments/7/runs/abc",
    ]
    assert browse_lines("s", "/st", "https://mlflow.lab", "7", None) == [
        "runs: https://mlflow.lab/#/experiments/7/runs"
    ]
    for uri in ("sqlite:////st/mlflow.db", "file:///st/mlruns"):  # a store nothing serves yet: how to open it
        assert browse_lines("s", "/st", uri, "7", "abc") == ["browse: sweeper ui s --storage /st"]


def test_ui_serves_the_sweep_store_prints_links_and_stops_on_ctrl_c(grid_sweep):
    storage, _ = grid_sweep
    meta = read_meta(str(storage), "grid")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sweeper.cli", "ui", "grid", "--storage", str(storage), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines, deadline = [], time.monotonic() + 120
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("parent:"):
                break
            assert time.monotonic() < deadline
        text = "".join(lines)
        assert f"runs: http://127.0.0.1:{port}/#/experiments/{meta.experiment_id}/runs" in text, text
        url = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get?experiment_id={meta.experiment_id}"
        with urllib.request.urlopen(url, timeout=10) as r:  # the UI reads the sweep's own store
            assert json.loads(r.read())["experiment"]["name"] == "grid"
        tree = descendants(proc.pid) if Path("/proc/self/stat").exists() else []
        commands = [proc_cmdline(p) for p in tree]
        assert not [c for c in commands if "huey" in c or "_job_runner" in c], commands  # no GenAI job runner
        assert not [c for c in commands if "multiprocessing" in c], commands  # one request worker: no spawned ones
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err  # Ctrl-C: 130, like every command
    assert "stopped the MLflow UI on SIGINT" in err and "Traceback" not in err
    assert live(tree) == [], "left running: " + ", ".join(live(tree))  # the whole server tree went with it
    time.sleep(1)
    with socket.socket() as s:  # the server went with it
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_ui_bad_inputs_exit_2(tmp_path, capsys):
    assert main(["ui", "nosuch", "--storage", str(tmp_path)]) == 2
    assert "no sweep 'nosuch'" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["ui", "--storage", str(tmp_path), "--port", str(port)]) == 2
        assert f"--port {port} is in use" in capsys.readouterr().err


TAG = "SWEEPER_TEST_UI_TAG"  # inherited by every process the UI starts, however it detaches


def _tagged(tag: str) -> list[str]:
    """Every live process whose environment carries the test's tag."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(entry.name)
    return live(found)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from Linux's /proc")
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])  # SIGINT: the test above
def test_ui_stopped_by_any_signal_takes_its_whole_server_tree_with_it(tmp_path, sig, code):
    """`kill PID` or a closed terminal once left mlflow ui, uvicorn and the huey workers serving under PID 1 (the
    job runner is off by default now: two request workers give the tree its depth)."""
    port, tag = _free_port(), uuid.uuid4().hex
    cmd = [sys.executable, "-m", "sweeper.cli", "ui", "--storage", str(tmp_path), "--port", str(port)]  # empty store
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, TAG: tag, "MLFLOW_WORKERS": "2"},  # the user's setting wins: a supervisor and 2 workers
        start_new_session=True,
    )  # its own group: cleanup below
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()  # a reader thread: a silent process never blocks the deadline
    tree: list[str] = []
    try:
        deadline = time.monotonic() + 150  # mlflow ui takes ~30 s to start on 2 busy cores
        while not any(line.startswith("ui: ") for line in lines):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "sweeper ui printed no link within 150 s"
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:  # it serves HTTP
            assert r.status == 200
        tree = descendants(proc.pid)
        assert len(tree) >= 3 and set(tree) <= set(_tagged(tag)), tree  # mlflow ui, uvicorn and its workers, huey
        groups = {proc_stat(p)[2] for p in tree if proc_stat(p)}
        assert str(proc.pid) not in groups  # the server runs in its own process group, away from the terminal's

        proc.send_signal(sig)
        code_seen = proc.wait(timeout=15)  # a hang guard: the tree must stop, not wait for us
        err = proc.stderr.read()
        assert code_seen == code, err
        assert f"stopped the MLflow UI on {sig.name}" in err and "Traceback" not in err, err
        assert live(tree) == [] and _tagged(tag) == [], "left running: " + ", ".join(live(tree) + _tagged(tag))
        left = [
            e.name
            for e in Path("/proc").iterdir()
            if e.name.isdigit() and (st := proc_stat(e.name)) and st[2] in groups and st[0] not in ("Z", "X")
        ]
        assert left == [], left  # nothing in the server's process group either
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # the port is free again
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in _tagged(tag):  # only what this test started (the tag, unlike a bare pid, cannot be reused)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
