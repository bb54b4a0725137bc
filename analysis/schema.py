"""What the writer of a sweep (``sweeper``) and its readers (``analysis``) agree on, in one place.

* the MLflow tag names, the one client factory and a quick reachability check of a tracking URI;
* how a trial is keyed: a hash of its full config, the same on every node and after every restart;
* how one row of results is made from a config and metrics: config fields keep their names, and
  a metric whose name is also a config field is renamed (:data:`METRIC_RENAMES`, else
  ``<name>_metric``), so a metric can never overwrite the config that produced it;
* the sweep folder's ``sweeper.json`` as a :class:`SweepMeta`, read and written through pyarrow's
  filesystems, so a local folder and a ``file://`` or ``s3://`` storage are read alike;
* a trial's status in every view (:func:`trial_status`): a run still marked running whose driver
  process is gone is interrupted.

Nothing here imports ``sweeper``: the analysis layer stays below the CLI and the orchestrator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainables.config import SweeperError

TAG_SWEEP = "sweeper.sweep"
TAG_KEY = "sweeper.trial_key"
TAG_TRIAL_ID = "sweeper.trial_id"
TAG_STATUS = "sweeper.status"
TAG_KIND = "sweeper.kind"  # 'sweep' (the parent run), 'trial' (a model) or 'defence' (a search's defence)
TAG_DEFENCE = "sweeper.defence_key"  # on a defence search's model runs: the defence they were trained for
TAG_COMMIT = "sweeper.git_commit"
TAG_ERROR = "sweeper.error"
TAG_DIVERGED_EPOCH = "sweeper.diverged_epoch"
TAG_PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: nests a trial run under the sweep's parent run
FINAL_STATUSES = ("completed", "diverged")
META = "sweeper.json"

# metrics that share a name with a config field: the per-epoch penalty value, the last epoch's
# scheduled learning rate and the number of samples actually averaged into the Hessian
METRIC_RENAMES = {"penalty": "penalty_value", "lr": "lr_last", "hessian_samples": "hessian_samples_used"}


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


def trial_statuses(uri: str, experiment_id: str, kind: str = "trial") -> dict[str, str]:
    """trial key -> status tag of an experiment's trial runs (what ``sweeper status`` counts).

    On the embedded SQLite store the tags are read directly, read-only, in milliseconds: importing
    MLflow and opening its store takes seconds. Any other store, or any surprise in the SQLite file,
    goes through MLflow's client (tests compare the two).
    """
    if uri.startswith("sqlite:///"):
        import sqlite3

        path = uri[len("sqlite:///") :]
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
            try:
                rows = con.execute(
                    "SELECT k.value, s.value FROM runs r "
                    "JOIN tags kind ON kind.run_uuid = r.run_uuid AND kind.key = ? AND kind.value = ? "
                    "JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = ? "
                    "LEFT JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = ? "
                    "WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active'",
                    (TAG_KIND, kind, TAG_KEY, TAG_STATUS, int(experiment_id)),
                ).fetchall()
            finally:
                con.close()
            return {key: status or "running" for key, status in rows}
        except (sqlite3.Error, ValueError):
            pass
    return trial_statuses_mlflow(uri, experiment_id, kind)


def trial_statuses_mlflow(uri: str, experiment_id: str, kind: str = "trial") -> dict[str, str]:
    """:func:`trial_statuses` through MLflow's client (any store)."""
    return {
        r.data.tags.get(TAG_KEY): r.data.tags.get(TAG_STATUS, "running") for r in trial_runs(uri, experiment_id, kind)
    }


def trial_runs(uri: str, experiment_id: str, kind: str = "trial") -> list:
    """The trial (child) runs of an experiment — or with ``kind='defence'`` a search's defence runs."""
    return client(uri).search_runs([experiment_id], filter_string=f"tags.`{TAG_KIND}` = '{kind}'", max_results=50_000)


KEY_FORMAT = 2  # the trial-key format new sweeps write (sweeper.json's key_format; absent: 1)


def trial_key(config: dict[str, Any], key_format: int = KEY_FORMAT) -> str:
    """A stable 16-hex id of a trial's full config (what makes two trials the same trial).

    Format 2 hashes only the fields that differ from their defaults (with the format number), so a
    new field with a default leaves every existing key, and so every resumable sweep, as it was.
    Changing a field's default is a key-breaking change: it needs a new format. Format 1 (sweeps
    made before it) hashed every field.
    """
    if key_format >= 2:
        defaults = field_defaults(config.get("kind", "network"))
        config = {k: v for k, v in config.items() if k not in defaults or _json(v) != _json(defaults[k])}
        config["_key_format"] = key_format
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)  # a tuple default equals its list value


def field_defaults(kind: str) -> dict[str, Any]:
    """Each field's default of a trial kind's config (``kind`` itself included: never hashed)."""
    from trainables import config_class

    try:
        cls = config_class(kind)
    except SweeperError:  # an unknown kind (a plugin not loaded here): every field is hashed
        return {}
    out = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    out.update(
        {f.name: f.default_factory() for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING}
    )
    out["kind"] = kind
    return out


def metric_column(name: str, config_fields) -> str:
    """The results column of metric ``name``: renamed when a config field has that name."""
    if name in METRIC_RENAMES:
        return METRIC_RENAMES[name]
    return f"{name}_metric" if name in config_fields else name


def trial_row(config: dict[str, Any], metrics: dict[str, Any], config_fields) -> dict[str, Any]:
    """One results row: every config field under its own name, then the metrics (scalars only)."""
    row = {k: v for k, v in config.items() if k in config_fields}
    for k, v in metrics.items():
        if isinstance(v, dict | list):
            continue
        row[metric_column(k, config_fields)] = v
    return row


# ----------------------------------------------------------------------------- the sweep folder
@dataclass
class SweepMeta:
    """A sweep's ``sweeper.json``: what it owes, where it tracks, how it runs (written once at launch;
    ``driver`` is rewritten by each resume). Read and written only through :func:`read_meta` /
    :func:`write_meta`."""

    name: str  # folder and MLflow experiment
    storage: str  # absolute local folder, or a URI (file://, s3://...)
    mlflow_uri: str  # the tracking store
    spec: dict[str, Any]  # SweepSpec.to_dict() (grid) or the search space; spec["axes"] names what varies
    n_trials: int  # trials the sweep owes (a search: its budget)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None until Ray says whether the cluster has GPUs
    max_concurrent: int | None = None
    max_failures: int = 2
    address: str | None = None  # the Ray cluster it joined (None: a local Ray)
    verbose: int = 1
    live: bool | None = None  # progress as a live bar (None: when stdout is a terminal)
    created: str = ""  # local time of the launch
    git_commit: str = ""
    driver: dict[str, Any] = field(default_factory=dict)  # host and pid of the process running it
    trials: list[dict[str, Any]] | None = None  # grid: every owed trial's key and varying values
    kind: str = "grid"  # grid | search
    search: dict[str, Any] | None = None  # budget, sampler, seed, optuna_storage
    experiment_id: str | None = None
    parent_run_id: str | None = None
    key_format: int = 1  # trial keys' format (trial_key); sweeps written before it have none: 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepMeta:
        """Tolerates keys of other versions: unknown ones are dropped, missing ones take defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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


def write_meta(storage: str | Path, name: str, meta: SweepMeta) -> None:
    """Write ``sweeper.json`` atomically (a temporary file moved into place)."""
    fs, root = _fs(storage)
    fs.create_dir(f"{root}/{name}", recursive=True)
    tmp, final = f"{root}/{name}/{META}.tmp", f"{root}/{name}/{META}"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(meta.to_dict(), indent=2, default=str).encode())
    fs.move(tmp, final)


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


def trial_status(tag: str | None, alive: bool) -> str:
    """A trial's status as every view shows it (``sweeper status``, the run and resume summaries,
    ``frontier``, ``report``): its MLflow run's ``sweeper.status`` tag (none yet: running), except
    that a run still marked running whose driver is gone (``alive`` False) is ``interrupted``."""
    status = tag if isinstance(tag, str) and tag else "running"
    return "interrupted" if status == "running" and not alive else status
