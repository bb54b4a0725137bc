"""``sweeper ui``: the MLflow UI on a sweep's store, its links, and a clean stop on Ctrl-C."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from analysis.schema import read_meta
from sweeper.cli import main
from sweeper.ui import browse_lines, ui_links


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_links_open_the_runs_table_not_the_genai_overview():
    links = ui_links("http://127.0.0.1:5000/", "7", "abc")
    assert links["runs"] == "http://127.0.0.1:5000/#/experiments/7/runs"
    assert links["parent"] == "http://127.0.0.1:5000/#/experiments/7/runs/abc"


def test_run_ends_with_a_tracking_servers_direct_links_else_the_ui_command():
    """`sweeper run` / `resume` end with these lines (sweeper.cli._report)."""
    assert browse_lines("s", "/st", "http://mlflow.lab:5000/", "7", "abc") == [
        "runs: http://mlflow.lab:5000/#/experiments/7/runs", "parent: http://mlflow.lab:5000/#/experiments/7/runs/abc"]
    assert browse_lines("s", "/st", "https://mlflow.lab", "7", None) == ["runs: https://mlflow.lab/#/experiments/7/runs"]
    for uri in ("sqlite:////st/mlflow.db", "file:///st/mlruns"):  # a store nothing serves yet: how to open it
        assert browse_lines("s", "/st", uri, "7", "abc") == ["browse: sweeper ui s --storage /st"]


def test_ui_serves_the_sweep_store_prints_links_and_stops_on_ctrl_c(grid_sweep):
    storage, _ = grid_sweep
    meta = read_meta(str(storage), "grid")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sweeper.cli", "ui", "grid", "--storage", str(storage),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped the MLflow UI" in out and "Traceback" not in err
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
