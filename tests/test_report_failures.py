"""`sweeper report` when things go wrong: a tracking server that does not answer, a report stopped
part-way, an existing folder. Real sweeps, real processes, real MLflow stores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
from conftest import driver_text

from sweeper.cli import main

DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens there


def sweeper(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The console command in its own process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "sweeper.cli", *args], capture_output=True, text=True, timeout=timeout)


def leftovers(out: Path) -> list[str]:
    """Hidden staging folders of ``out`` left in its parent."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_report_with_a_dead_tracking_server_falls_back_within_seconds(grid_sweep, tmp_path):
    storage, _ = grid_sweep
    for extra in ([], ["--no-log-to-mlflow"]):
        out = tmp_path / f"rep{len(extra)}"
        res = sweeper(  # timeout: a hang guard (MLflow's retries take minutes), not a speed target
            "report", "grid", "--storage", str(storage), "--out", str(out), "--mlflow-uri", DEAD, *extra, timeout=30
        )
        text = res.stdout + res.stderr
        assert res.returncode == 0, text
        assert "Traceback" not in text, text
        assert "MLflow unavailable" in res.stderr and "Connection refused" in res.stderr, res.stderr  # the note
        assert "report: 6 trials read from ray" in res.stderr and "report: eigenvector images" in res.stderr
        assert ("not logged to MLflow" in res.stderr) == (not extra), res.stderr
        csv = pd.read_csv(out / "results.csv")
        assert len(csv) == 6 and sorted(csv["status"]) == ["completed"] * 4 + ["diverged"] * 2
        # the artifacts came from the embedded store's files and the checkpoints, not through the dead server
        for png in ("eigenvectors.png", "asr_vs_theta.png", "frontier.png"):
            assert (out / png).stat().st_size > 1000, png
        summary = (out / "summary.md").read_text()
        assert "## Notes" in summary and "MLflow unavailable" in summary
        assert leftovers(out) == []


def test_a_report_stopped_part_way_leaves_no_folder_and_a_rerun_works(grid_sweep, tmp_path):
    storage, _ = grid_sweep
    out = tmp_path / "rep"
    argv = [
        sys.executable,
        "-m",
        "sweeper.cli",
        "report",
        "grid",
        "--storage",
        str(storage),
        "--out",
        str(out),
        "--no-log-to-mlflow",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen, staged = [], []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("report: eigenvector images"):  # figures are being written
                staged = leftovers(out)
                os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
                break
        rest_out, rest_err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(seen) + rest_err
    assert staged, text  # stopped part-way: the report was being written beside --out
    assert proc.returncode == 130 and "sweeper: interrupted" in text, text
    assert "Traceback" not in driver_text(text), text
    assert not out.exists() and leftovers(out) == [], text  # nothing half-written anywhere

    assert main(["report", "grid", "--storage", str(storage), "--out", str(out), "--no-log-to-mlflow"]) == 0
    assert (out / "summary.md").is_file() and len(pd.read_csv(out / "results.csv")) == 6
    assert leftovers(out) == []


def test_overwrite_replaces_the_report_and_keeps_other_files(grid_sweep, tmp_path, capsys):
    storage, _ = grid_sweep
    out = tmp_path / "rep"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "results.csv").write_text("stale")
    assert main(["report", "grid", "--storage", str(storage), "--out", str(out), "--no-log-to-mlflow"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (out / "results.csv").read_text() == "stale"  # refused: untouched
    assert (
        main(["report", "grid", "--storage", str(storage), "--out", str(out), "--no-log-to-mlflow", "--overwrite"]) == 0
    )
    assert (out / "notes.txt").read_text() == "mine"
    assert len(pd.read_csv(out / "results.csv")) == 6 and (out / "summary.html").is_file()
    assert leftovers(out) == []
