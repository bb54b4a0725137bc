"""``sweeper ui``: the MLflow UI on a sweep's store, opened at the sweep's runs table.

MLflow 3 lands a new user in its GenAI overview (traces, token usage); the links printed here go
straight to the runs table and the sweep's parent run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from analysis.schema import check_uri, client, read_meta
from trainables.config import SweeperError

from .preflight import check_name, resolve_storage
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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL (the whole tree stops in ~1.5 s on 2 busy cores)


class UIStopped(Exception):  # a stop asked for, not an error: no SweeperError (that exits 2)
    """``sweeper ui`` stopped by a signal after its server was stopped; ``exit_code`` is 128 + the signal's
    number, the shell's convention: 130 for Ctrl-C (SIGINT), 143 for SIGTERM, 129 for SIGHUP."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped the MLflow UI on {signal.Signals(signum).name}")


@contextlib.contextmanager
def _stop_signals():
    """SIGINT, SIGTERM and SIGHUP noted while the UI runs; once armed, one raises :class:`UIStopped`.

    Yields ``arm(on=True)``. Arming happens only after ``Popen`` returned, so a signal can never leave a
    started server without its handle; a signal seen before that is raised by ``arm()``. Outside the
    main thread (where Python allows no handlers) nothing is installed.
    """
    state = {"armed": False, "seen": []}

    def handler(signum, frame):
        state["seen"].append(signum)
        if state["armed"]:
            raise UIStopped(signum)

    def arm(on: bool = True) -> None:
        state["armed"] = on
        if on and state["seen"]:
            raise UIStopped(state["seen"][0])

    if threading.current_thread() is not threading.main_thread():
        yield lambda on=True: None
        return
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield arm
        if state["seen"]:  # a signal during the cleanup still ends the command as a stop
            raise UIStopped(state["seen"][0])
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is left in process group ``pgid``."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():  # not Linux: a zombie counts as alive, hence the SIGKILL fallback's bound
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited while we looked
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE) -> None:
    """Stop the process group led by ``proc`` (started with ``start_new_session``): SIGTERM to every member,
    SIGKILL to what is left after ``grace`` seconds. Returns once none is alive, or a bounded time later."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # nothing left in the group
            break
        deadline = time.monotonic() + wait
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
            proc.poll()  # reap the leader: our own zombie would keep the group alive on a system without /proc
        if not _group_alive(proc.pid):
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(1)


def serve_ui(
    name: str | None, storage: str, mlflow_uri: str | None, port: int, echo=print, ready_timeout: float = 90.0
) -> dict[str, Any]:
    """Start ``mlflow ui`` on a sweep's store (127.0.0.1 only), print the links, serve until stopped.

    The server runs in its own session; SIGINT (Ctrl-C), SIGTERM or SIGHUP (a closed terminal) stop its
    whole process tree (uvicorn's workers, the huey job consumers) and then raise :class:`UIStopped`.
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
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ}
    # MLflow (3.17 here) starts a job runner beside a database-backed server (GenAI jobs: 8 more processes, ~15
    # CPU-s at start, measured); a sweep's store has no such jobs. The user's own settings win.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # one request worker, not MLflow's 4 (each a process importing the server: ~2.6 CPU-s): one person browses
    env.setdefault("MLFLOW_WORKERS", "1")
    with tempfile.TemporaryFile() as log_file:  # a pipe nobody reads would fill up and stall the server
        links: dict[str, str] = {}
        with _stop_signals() as arm:
            # its own session: a closed terminal's SIGHUP or a Ctrl-C reaches only us, and we stop the whole tree
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True, env=env)
            try:
                arm()  # from here a stop signal raises UIStopped; one that came during Popen is raised now
                deadline = time.monotonic() + ready_timeout
                while True:
                    if proc.poll() is not None:
                        log_file.seek(0)
                        err = log_file.read().decode(errors="replace").strip().splitlines()
                        raise SweeperError(
                            f"mlflow ui exited with code {proc.returncode}: {err[-1] if err else 'no output'}"
                        )
                    try:
                        with urllib.request.urlopen(base + "/health", timeout=2):  # noqa: S310 (our loopback server)
                            break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise SweeperError(
                                f"mlflow ui did not answer on {base} within {ready_timeout:.0f} s"
                            ) from None
                        time.sleep(0.5)
                links = ui_links(base, exp_id, parent)
                echo(f"MLflow UI on {base} (store {uri}); Ctrl-C stops it")
                for k, v in links.items():
                    echo(f"{k}: {v}")
                proc.wait()
            finally:
                try:  # first in the finally: a signal landing before arm(False) takes effect still stops the tree
                    arm(False)  # a second signal must not cut the cleanup short: it is only noted
                finally:
                    stop_group(proc)  # uvicorn's workers and the huey consumers outlive the leader otherwise
    return links
