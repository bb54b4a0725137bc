"""``sweeper ui``: the MLflow UI on a sweep's store, opened at the sweep's runs table.

MLflow 3 lands a new user in its GenAI overview (traces, token usage); the links printed here go
straight to the runs table and the sweep's parent run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from analysis.schema import check_uri, client, read_meta
from trainables.config import SweeperError

from .orchestrate import check_name, resolve_storage
from .tracking import default_uri, retry


def ui_links(base: str, experiment_id: str | None, parent_run_id: str | None) -> dict[str, str]:
    """Direct links into the MLflow UI: the sweep's runs table (not MLflow 3's GenAI overview) and its parent run."""
    base = base.rstrip("/")
    links = {"ui": f"{base}/#/experiments"}
    if experiment_id:
        links["runs"] = f"{base}/#/experiments/{experiment_id}/runs"
        if parent_run_id:
            links["parent"] = f"{base}/#/experiments/{experiment_id}/runs/{parent_run_id}"
    return links


def browse_lines(name: str, storage: str, uri: str, experiment_id: str | None, parent_run_id: str | None) -> list[str]:
    """How to browse a finished sweep, as ``sweeper run`` and ``resume`` print it: a tracking server's direct
    links (runs table, parent run), else the ``sweeper ui`` command that serves the sweep's own store."""
    if uri.startswith(("http://", "https://")):
        links = ui_links(uri, experiment_id, parent_run_id)
        return [f"{k}: {links[k]}" for k in ("runs", "parent") if k in links] or [f"ui: {links['ui']}"]
    return [f"browse: sweeper ui {name} --storage {storage}"]


def serve_ui(name: str | None, storage: str, mlflow_uri: str | None, port: int, echo=print,
             ready_timeout: float = 90.0) -> dict[str, Any]:
    """Start ``mlflow ui`` on a sweep's store (127.0.0.1 only), print the links, run until Ctrl-C.

    A tracking server (``http(s)://``) already serves a UI: its links are printed and nothing starts.
    """
    storage = resolve_storage(storage)
    meta = None
    if name is not None:
        check_name(name)
        meta = read_meta(storage, name)
        if meta is None and mlflow_uri is None:
            raise SweeperError(f"no sweep {name!r} in {storage}; list them with `ls {storage}` or pass --mlflow-uri")
    uri = mlflow_uri or (meta.mlflow_uri if meta else None) or default_uri(Path(storage))
    check_uri(uri)
    exp_id, parent = (meta.experiment_id, meta.parent_run_id) if meta else (None, None)
    if meta is None and name is not None:
        exp = retry(lambda: client(uri).get_experiment_by_name(name), "finding the experiment", attempts=2)
        exp_id = exp.experiment_id if exp is not None else None
    if uri.startswith(("http://", "https://")):
        links = ui_links(uri, exp_id, parent)
        for k, v in links.items():
            echo(f"{k}: {v}")
        return links
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise SweeperError(f"--port {port} is in use on 127.0.0.1; choose another (1-65535)")
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port)]
    with tempfile.TemporaryFile() as log_file:  # a pipe nobody reads would fill up and stall the server
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True)
        links: dict[str, str] = {}
        try:
            deadline = time.monotonic() + ready_timeout
            while True:
                if proc.poll() is not None:
                    log_file.seek(0)
                    err = log_file.read().decode(errors="replace").strip().splitlines()
                    raise SweeperError(f"mlflow ui exited with code {proc.returncode}: {err[-1] if err else 'no output'}")
                try:
                    with urllib.request.urlopen(base + "/health", timeout=2):  # noqa: S310 (our own loopback server)
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SweeperError(f"mlflow ui did not answer on {base} within {ready_timeout:.0f} s") from None
                    time.sleep(0.5)
            links = ui_links(base, exp_id, parent)
            echo(f"MLflow UI on {base} (store {uri}); Ctrl-C stops it")
            for k, v in links.items():
                echo(f"{k}: {v}")
            proc.wait()
        except KeyboardInterrupt:
            echo("stopped the MLflow UI")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    return links
