"""Reading and writing the sweep record whose format is :mod:`trainables.record` (re-exported here).

* the one MLflow client factory and a quick reachability check of a tracking URI; the trial runs
  and their statuses;
* the sweep folder's ``sweeper.json`` (a :class:`SweepMeta`), read and written through pyarrow's
  filesystems, so a local folder and a ``file://`` or ``s3://`` storage are read alike;
* whether a sweep's driver process is alive (a run still marked running whose driver is gone is
  interrupted: :func:`trial_status`).

Nothing here imports ``sweeper``: the analysis layer stays below the CLI and the orchestrator.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from trainables.config import SweeperError
from trainables.record import (  # noqa: F401 - the record format, re-exported: readers name it schema.TAG_KEY, ...
    FINAL_STATUSES,
    KEY_FORMAT,
    META,
    METRIC_RENAMES,
    TAG_COMMIT,
    TAG_DEFENCE,
    TAG_DIVERGED_EPOCH,
    TAG_ERROR,
    TAG_KEY,
    TAG_KIND,
    TAG_PARENT_RUN,
    TAG_STATUS,
    TAG_SWEEP,
    TAG_TRIAL_ID,
    SweepMeta,
    field_defaults,
    metric_column,
    trial_key,
    trial_row,
    trial_status,
)


def client(uri: str):
    """An MlflowClient bound to ``uri`` (no global MLflow state is touched)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail early, with one line, when the tracking URI cannot work (a server gets ``timeout`` seconds)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.parent.is_dir():  # a typo must not leave a tree of folders behind: the folder must exist
            raise SweeperError(
                f"--mlflow-uri {uri}: folder {path.parent} does not exist; create it first or "
                f"name a file in an existing folder"
            )
        if not os.access(path.parent, os.W_OK):
            raise SweeperError(f"--mlflow-uri {uri}: folder {path.parent} is not writable")
        return
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (the user's tracking server)
                if r.status != 200:
                    raise SweeperError(f"--mlflow-uri {uri}: {url} answered HTTP {r.status}, expected 200")
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise SweeperError(
                f"--mlflow-uri {uri} is unreachable ({reason}); start the server "
                f"(mlflow server --host 127.0.0.1 --port 5000) or omit the flag for the embedded store"
            ) from None
        _check_credentials(uri, timeout)
        return
    if uri.startswith("file:") or uri.startswith("/"):
        return
    raise SweeperError(f"--mlflow-uri {uri!r} is invalid: expected sqlite:///PATH, http(s)://HOST:PORT or file:PATH")


def _check_credentials(uri: str, timeout: float) -> None:
    """One authenticated read, with the credentials MLflow's client will send (MLFLOW_TRACKING_USERNAME /
    _PASSWORD, or MLFLOW_TRACKING_TOKEN): a server with authentication answers 401 to missing or wrong ones."""
    import base64

    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    req = urllib.request.Request(url)
    if user and password:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        req.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    try:
        with urllib.request.urlopen(req, timeout=timeout):  # noqa: S310 (the user's tracking server)
            return
    except urllib.error.HTTPError as e:
        if e.code not in (401, 403):
            return  # not an authentication answer: left to MLflow's own client
        if user and password:
            raise SweeperError(
                f"--mlflow-uri {uri}: the server refused the credentials of MLFLOW_TRACKING_USERNAME="
                f"{user!r} (HTTP {e.code}); check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
            ) from None
        raise SweeperError(
            f"--mlflow-uri {uri} requires authentication (HTTP {e.code}); set MLFLOW_TRACKING_USERNAME "
            f"and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
        ) from None
    except (urllib.error.URLError, OSError):
        return


T = TypeVar("T")


def read_sqlite(uri: str, read: Callable[[Any], T], timeout: float = 10) -> T | None:
    """``read(connection)`` on a read-only connection to the embedded SQLite store ``uri``, or None when the
    store cannot be read that way: not ``sqlite:///``, no such file, or any SQLite error (another MLflow
    schema, a locked file). Every direct reader of the store goes through here; callers fall back to MLflow's
    client (or, for ``plan``, to the rough model). The file is opened by URI, so any character in the path
    is quoted."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    import sqlite3

    path = Path(uri[len("sqlite:///") :])
    if not path.is_file():
        return None
    try:
        con = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True, timeout=timeout)
        try:
            return read(con)
        finally:
            con.close()
    except sqlite3.Error:
        return None


def trial_statuses(uri: str, experiment_id: str, kind: str = "trial") -> dict[str, str]:
    """trial key -> status tag of an experiment's trial runs (what ``sweeper status`` counts).

    On the embedded SQLite store the tags are read directly, read-only, in milliseconds: importing
    MLflow and opening its store takes seconds. Any other store, or any surprise in the SQLite file,
    goes through MLflow's client (tests compare the two).
    """
    try:
        exp = int(experiment_id)
    except ValueError:
        return trial_statuses_mlflow(uri, experiment_id, kind)
    rows = read_sqlite(
        uri,
        lambda con: con.execute(
            "SELECT k.value, s.value FROM runs r "
            "JOIN tags kind ON kind.run_uuid = r.run_uuid AND kind.key = ? AND kind.value = ? "
            "JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = ? "
            "LEFT JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = ? "
            "WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active'",
            (TAG_KIND, kind, TAG_KEY, TAG_STATUS, exp),
        ).fetchall(),
    )
    if rows is None:
        return trial_statuses_mlflow(uri, experiment_id, kind)
    return {key: status or "running" for key, status in rows}


class RunRecord(NamedTuple):
    """One MLflow run as the analysis reads it: its id, tags, params (strings) and latest metrics."""

    run_id: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]


# The experiment's id by name, only when exactly one experiment has that name (a store whose schema keeps
# workspaces may hold one per workspace: MLflow's client then decides which): two parameters, the name twice.
EXPERIMENT = (
    "SELECT experiment_id FROM experiments WHERE name = ? AND (SELECT COUNT(*) FROM experiments WHERE name = ?) = 1"
)


def sqlite_runs(uri: str, experiment: str) -> list[RunRecord] | None:
    """Every active run of experiment ``experiment`` in the embedded SQLite store ``uri`` (tags, params and
    latest metrics), read-only in one query, in the order MLflow's ``search_runs`` gives (start time
    descending, then run id). None when the store cannot be read this way (not SQLite, an unexpected
    schema, a locked file): callers then go through MLflow's client, which a test compares with this.

    Why: MLflow's client builds an ORM object per metric and param (0.8 s for 100 runs of 160 values,
    seconds at 1,000), and importing it takes another second; the table arithmetic after it takes
    milliseconds. The SQL follows MLflow's own reader: a NaN metric is stored as 0 with ``is_nan``.
    """
    runs = f"SELECT run_uuid, start_time FROM runs WHERE lifecycle_stage = 'active' AND experiment_id = ({EXPERIMENT})"
    sql = (
        f"WITH r AS ({runs}) "
        "SELECT r.run_uuid, r.start_time, 0, t.key, t.value, 0 FROM r JOIN tags t ON t.run_uuid = r.run_uuid "
        "UNION ALL SELECT r.run_uuid, r.start_time, 1, p.key, p.value, 0 FROM r JOIN params p "
        "ON p.run_uuid = r.run_uuid "
        "UNION ALL SELECT r.run_uuid, r.start_time, 2, m.key, m.value, m.is_nan FROM r JOIN latest_metrics m "
        "ON m.run_uuid = r.run_uuid"
    )
    rows = read_sqlite(uri, lambda con: con.execute(sql, (experiment, experiment)).fetchall())
    if not rows:  # not readable here; or no run, or no such experiment: the client says which, in its words
        return None
    out: dict[str, RunRecord] = {}
    start: dict[str, int] = {}
    for run_id, started, what, key, value, is_nan in rows:
        rec = out.get(run_id)
        if rec is None:
            rec = out[run_id] = RunRecord(run_id, {}, {}, {})
            start[run_id] = started if started is not None else -1
        if what == 0:
            rec.tags[key] = value
        elif what == 1:
            rec.params[key] = value
        else:
            rec.metrics[key] = float("nan") if is_nan else float(value)
    return sorted(out.values(), key=lambda r: (-start[r.run_id], r.run_id))


def sqlite_histories(uri: str, experiment: str, metrics: tuple[str, ...]) -> list[tuple] | None:
    """Every logged point of ``metrics`` of the active runs of ``experiment`` in the embedded SQLite store, in
    one query: (run id, metric, step, value); None when the store cannot be read this way (callers then ask
    MLflow's client per run). Callers order the points themselves."""
    keys = ",".join("?" * len(metrics))  # no metrics: SQLite's empty IN () matches nothing
    sql = (
        "SELECT m.run_uuid, m.key, m.step, m.value, m.is_nan FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
        f"WHERE r.lifecycle_stage = 'active' AND r.experiment_id = ({EXPERIMENT}) AND m.key IN ({keys})"
    )
    rows = read_sqlite(uri, lambda con: con.execute(sql, (experiment, experiment, *metrics)).fetchall())
    if rows is None:
        return None
    return [(r, k, int(step), float("nan") if is_nan else float(v)) for r, k, step, v, is_nan in rows]


def mlflow_runs(uri: str, experiment: str) -> list[RunRecord]:
    """:func:`sqlite_runs` through MLflow's client (any store); an unknown experiment is an error."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise SweeperError(f"no MLflow experiment {experiment!r} at {uri}")
    runs, token = [], None
    while True:
        page = c.search_runs([exp.experiment_id], max_results=5000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return [RunRecord(r.info.run_id, dict(r.data.tags), dict(r.data.params), dict(r.data.metrics)) for r in runs]


def experiment_runs(uri: str, experiment: str) -> list[RunRecord]:
    """Every active run of an experiment: from the SQLite file directly when the store is the embedded
    one, else through MLflow's client."""
    fast = sqlite_runs(uri, experiment)
    return fast if fast is not None else mlflow_runs(uri, experiment)


def trial_statuses_mlflow(uri: str, experiment_id: str, kind: str = "trial") -> dict[str, str]:
    """:func:`trial_statuses` through MLflow's client (any store)."""
    return {
        r.data.tags.get(TAG_KEY): r.data.tags.get(TAG_STATUS, "running") for r in trial_runs(uri, experiment_id, kind)
    }


def trial_runs(uri: str, experiment_id: str, kind: str = "trial") -> list:
    """The trial (child) runs of an experiment — or with ``kind='defence'`` a search's defence runs."""
    return client(uri).search_runs([experiment_id], filter_string=f"tags.`{TAG_KIND}` = '{kind}'", max_results=50_000)


# ----------------------------------------------------------------------------- the sweep folder
def is_uri(storage: str) -> bool:
    """True for ``scheme://...`` storages (file://, s3://, gs://...), False for local paths."""
    return "://" in str(storage)


def _fs(storage: str):
    import pyarrow.fs

    storage = str(storage)
    if is_uri(storage):
        return pyarrow.fs.FileSystem.from_uri(storage)
    return pyarrow.fs.LocalFileSystem(), str(Path(storage).expanduser().absolute())


def read_meta(storage: str | Path, name: str) -> SweepMeta | None:
    """The sweep's ``sweeper.json``, or None when there is no such sweep."""
    import pyarrow.fs

    fs, root = _fs(storage)
    path = f"{root}/{name}/{META}"
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return SweepMeta.from_dict(json.loads(f.read().decode()))


def read_text(storage: str | Path, relpath: str) -> str | None:
    """The text of ``<storage>/<relpath>`` on a local or remote store, or None when it cannot be read."""
    try:
        fs, root = _fs(storage)
        with fs.open_input_stream(f"{root}/{relpath}") as f:
            return f.read().decode()
    except (OSError, ValueError):  # absent, unreadable, or a store this node cannot reach
        return None


def write_text(storage: str | Path, relpath: str, text: str) -> None:
    """Write ``<storage>/<relpath>`` on a local or remote store atomically (a temporary file moved into place)."""
    fs, root = _fs(storage)
    final = f"{root}/{relpath}"
    fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(final + ".tmp") as f:
        f.write(text.encode())
    fs.move(final + ".tmp", final)


def write_meta(storage: str | Path, name: str, meta: SweepMeta) -> None:
    """Write ``sweeper.json`` atomically."""
    write_text(storage, f"{name}/{META}", json.dumps(meta.to_dict(), indent=2, default=str))


def sweep_exists(storage: str | Path, name: str) -> bool:
    """Whether ``<storage>/<name>`` exists at all (a sweep folder is never reused)."""
    import pyarrow.fs

    fs, root = _fs(storage)
    return fs.get_file_info(f"{root}/{name}").type != pyarrow.fs.FileType.NotFound


def local_folder(storage: str | Path, name: str) -> Path | None:
    """The sweep's folder as a local path (a ``file://`` URI too), or None on a remote store."""
    storage = str(storage)
    if storage.startswith("file://"):
        return Path(storage[len("file://") :]) / name
    if is_uri(storage):
        return None
    return Path(storage).expanduser().absolute() / name


# ----------------------------------------------------------------------------- a trial's status in every view
def driver_alive(meta: SweepMeta | None) -> bool:
    """Whether the process that runs the sweep is alive (True when it ran on another host, or is
    not recorded: unknown, so a running trial stays running)."""
    import socket

    driver = (meta.driver if meta is not None else None) or {}
    if driver.get("host") != socket.gethostname() or not driver.get("pid"):
        return True
    try:
        os.kill(int(driver["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    return True
