"""Every check a sweep makes before Ray starts or before its first trial: names, storage, the cluster's
address, token and resources, the data files the trials read. Each failure is one line naming the bad value
and what is valid (a :class:`SweeperError`, exit 2); nothing is written before they pass."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from analysis.schema import (
    is_uri,
)
from trainables.config import SweeperError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_name(name: str) -> None:
    """Sweep names become folder and experiment names."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise SweeperError(
            f"--name {name!r} is invalid: use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


def resolve_storage(storage: str) -> str:
    """Absolute local path (Ray changes the working directory of trials) or the URI unchanged."""
    if is_uri(storage):
        if not storage.startswith(("file://", "s3://", "gs://", "hdfs://", "abfs://")):
            raise SweeperError(
                f"--storage {storage!r} is invalid: expected a path or a file://, s3://, gs://, hdfs:// or abfs:// URI"
            )
        storage = storage.rstrip("/")
        if not storage.startswith("file://"):
            check_object_store(storage)
        return storage
    path = Path(storage).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise SweeperError(f"--storage {storage} is a file, expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SweeperError(f"--storage {storage}: cannot create folder: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise SweeperError(f"--storage {storage} is not writable")
    return str(path)


def check_object_store(storage: str) -> None:
    """An object-store ``--storage`` must answer (pyarrow's first request) before anything relies on it."""
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(storage)
        fs.get_file_info(root)
    except (OSError, ValueError, ImportError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SweeperError(f"--storage {storage}: cannot reach it ({reason})") from None


def check_address(address: str | None, timeout: float = 3.0) -> None:
    """A cluster address must parse and, for host:port, accept a TCP connection — before Ray starts."""
    if address in (None, "auto", "local"):
        return
    m = re.fullmatch(r"(ray://)?([A-Za-z0-9.\-]+|\[[0-9a-fA-F:]+\]):(\d{1,5})", address)
    if not m or not 0 < int(m.group(3)) < 65536:
        raise SweeperError(f"--address {address!r} is invalid: expected auto, HOST:PORT or ray://HOST:PORT")
    host, port = m.group(2).strip("[]"), int(m.group(3))
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise SweeperError(
            f"--address {address}: nothing answers at {host}:{port} ({e.strerror or e}); "
            f"start the cluster (ray start --head / ray up cluster.yaml) or omit --address"
        ) from None
    if not m.group(1):  # a GCS address (not Ray Client): does it take this driver's auth token?
        check_ray_auth(address)


_TOKEN_HELP = (
    "copy the head's ~/.ray/auth_token to this machine's ~/.ray/auth_token, or set RAY_AUTH_TOKEN "
    "(the token) or RAY_AUTH_TOKEN_PATH (its file); `ray get-auth-token` on the head prints it"
)


def ray_auth_token() -> tuple[str, str] | None:
    """(where, token) of the Ray auth token this process would send, in Ray's own order, or None."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN", os.environ["RAY_AUTH_TOKEN"].strip()
    for where in (os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")):
        if where and Path(where).is_file():
            return where, Path(where).read_text().strip()
    return None


def _auth_env() -> dict[str, str]:
    """The environment with token mode on when a token is at hand (Ray >= 2.59 heads demand one)."""
    env = dict(os.environ)
    if ray_auth_token() is not None:
        env.setdefault("RAY_AUTH_MODE", "token")
    return env


_PROBE = """
import sys
from ray._raylet import GcsClient
try:
    GcsClient(address=sys.argv[1]).internal_kv_keys(b"", namespace=None, timeout=10)
except Exception as e:
    print(type(e).__name__)
"""


def check_ray_auth(address: str, timeout: float = 60.0) -> None:
    """Ask the cluster's GCS, in a child process, whether it takes this driver (and its auth token).

    A child process because a driver in token mode without a token aborts inside Ray's C++ code.
    A refused token is one line naming where it came from; any other outcome is left to ray.init.
    """
    import subprocess
    import sys

    token = ray_auth_token()
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE, address], env=_auth_env(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return
    refused = "AuthenticationError" in out.stdout or "InvalidAuthToken" in out.stderr
    if refused and token is None:
        raise SweeperError(
            f"--address {address}: the Ray cluster requires an auth token and this machine has none; {_TOKEN_HELP}"
        )
    if refused:
        raise SweeperError(
            f"--address {address}: the Ray cluster refused the auth token from {token[0]}; "
            f"use the head's token: {_TOKEN_HELP}"
        )


def check_resources(opts) -> None:
    """The resources a trial asks for are positive numbers (``opts``: a :class:`~sweeper.orchestrate.SweepOptions`)."""
    if not opts.cpus_per_trial > 0:
        raise SweeperError(f"--cpus-per-trial={opts.cpus_per_trial} is invalid: must be > 0")
    if opts.gpus_per_trial is not None and opts.gpus_per_trial < 0:
        raise SweeperError(f"--gpus-per-trial={opts.gpus_per_trial} is invalid: must be >= 0 (fractions allowed)")
    if opts.max_concurrent is not None and opts.max_concurrent < 1:
        raise SweeperError(f"--max-concurrent={opts.max_concurrent} is invalid: must be >= 1")
    if opts.max_failures < 0:
        raise SweeperError(f"--max-failures={opts.max_failures} is invalid: must be >= 0")


def check_data(configs) -> None:
    """Every dataset the trials read is found and checked (checksums as configured) before Ray starts.

    Inside Ray a missing or corrupt file would fail every trial, each after its retries; here it is one
    line naming the file and the folder searched. Each (dataset, folder, checksum setting) is checked once, by
    its declared check or by loading it as a trial does. ``download`` trials fetch their own files and are not
    checked.
    """
    from trainables.data.datasets import check_dataset, dataset_params

    seen: set[tuple] = set()
    for cfg in configs:
        name, folder = getattr(cfg, "dataset", None), getattr(cfg, "data_dir", None)
        if name is None or folder is None or getattr(cfg, "download", False):
            continue
        params = dataset_params(cfg) if hasattr(cfg, "extra") else {}  # a network trial: its dataset's fields
        key = (name, str(folder), bool(getattr(cfg, "verify_checksums", True)))
        if (*key, *sorted(params.items())) in seen:
            continue
        seen.add((*key, *sorted(params.items())))
        try:
            check_dataset(*key, params=params)
        except SweeperError as e:
            raise SweeperError(f"{e} [dataset {name}, data_dir {folder}]") from None


def check_cluster_resources(cpus: float, gpus: float | None) -> None:
    """Some node (or an autoscaler node type) has what one trial asks for, else one line and exit 2.

    Ray would otherwise queue the trials forever, its autoscaler repeating "No available node types can
    fulfill resource request" every 35 s. On an autoscaling cluster whose node types could hold the trial,
    the sweep goes on, with a line saying that it waits for a node.
    """
    import sys

    import ray

    need = {"CPU": float(cpus), "GPU": float(gpus or 0)}
    ask = " and ".join(f"{v:g} {k}" for k, v in need.items() if v > 0)

    def fits(res: dict[str, float]) -> bool:
        return all(res.get(k, 0) >= v for k, v in need.items() if v > 0)

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if any(fits(n.get("Resources", {})) for n in nodes):
        return
    if any(fits(group) for group in _node_types()):
        print(
            f"sweeper: no node has {ask} yet; waiting for the autoscaler to start one (Ctrl-C to stop)",
            file=sys.stderr,
            flush=True,
        )
        return
    have = (
        "; ".join(
            f"{n.get('NodeManagerAddress', '?')}: {n.get('Resources', {}).get('CPU', 0):g} CPU, "
            f"{n.get('Resources', {}).get('GPU', 0):g} GPU"
            for n in nodes
        )
        or "no live node"
    )
    raise SweeperError(
        f"each trial asks for {ask} (--cpus-per-trial/--gpus-per-trial) but no node of the cluster "
        f"has that ({have}) and no autoscaler node type could add one; ask for less, or join a "
        f"cluster that has it (--address)"
    )


def _node_types() -> list[dict[str, float]]:
    """Resources of each node type the cluster's autoscaler may start (empty: no autoscaler)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        return [dict(g.resources) for g in (config.node_group_configs if config else [])]
    except Exception:  # a private API: when it moves, the sweep behaves as on a fixed cluster
        return []
