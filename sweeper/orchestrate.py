"""Ray Tune orchestration: one place builds the Tuner, runs, resumes and summarises sweeps.

A sweep lives in ``<storage>/<name>/``: Ray Tune's experiment folder (trial checkpoints,
results) plus our ``sweeper.json`` (the search space, the MLflow URI, experiment and parent run
ids, resources) which makes ``sweeper resume NAME`` and ``sweeper status NAME`` possible.
Trials checkpoint every epoch through :class:`trainables.train.Trial`, so an interrupted trial
continues from its last epoch and a finished one is never re-run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.schema import (  # noqa: F401 (re-exported)
    KEY_FORMAT,
    META,
    SweepMeta,
    driver_alive,
    is_uri,
    read_meta,
    sweep_exists,
    trial_row,
    trial_status,
    write_meta,
)
from trainables.config import SweeperError, TrialConfig

from . import tracking
from .cluster import check_shared_storage
from .spaces import SweepSpec
from .tracking import run_label

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass
class SweepOptions:
    """How to run a sweep (not what): resources, storage, tracking, failure policy."""

    name: str = "digits-demo"
    storage: str = "./sweeps"  # local folder (absolutized) or a URI such as file:///shared/sweeps
    address: str | None = None  # None: start a local Ray; 'auto' or host:port / ray://host:port: join
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: 1 when the cluster has GPUs, else 0
    max_concurrent: int | None = None
    mlflow_uri: str | None = None  # None: sqlite:///<storage>/mlflow.db
    max_failures: int = 2
    verbose: int = 1
    live: bool | None = None  # progress as one live bar (None: when stdout is a terminal) or plain lines


# ----------------------------------------------------------------------------- checks
def check_name(name: str) -> None:
    """Sweep names become folder and experiment names."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise SweeperError(f"--name {name!r} is invalid: use 1-100 letters, digits, '.', '_' or '-', "
                           f"starting with a letter or digit")


def resolve_storage(storage: str) -> str:
    """Absolute local path (Ray changes the working directory of trials) or the URI unchanged."""
    if is_uri(storage):
        if not storage.startswith(("file://", "s3://", "gs://", "hdfs://", "abfs://")):
            raise SweeperError(f"--storage {storage!r} is invalid: expected a path or a file://, s3://, gs://, "
                               f"hdfs:// or abfs:// URI")
        return storage.rstrip("/")
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
        raise SweeperError(f"--address {address}: nothing answers at {host}:{port} ({e.strerror or e}); "
                           f"start the cluster (ray start --head / ray up cluster.yaml) or omit --address") from None
    if not m.group(1):  # a GCS address (not Ray Client): does it take this driver's auth token?
        check_ray_auth(address)


_TOKEN_HELP = ("copy the head's ~/.ray/auth_token to this machine's ~/.ray/auth_token, or set RAY_AUTH_TOKEN "
               "(the token) or RAY_AUTH_TOKEN_PATH (its file); `ray get-auth-token` on the head prints it")


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
        out = subprocess.run([sys.executable, "-c", _PROBE, address], env=_auth_env(), capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return
    refused = "AuthenticationError" in out.stdout or "InvalidAuthToken" in out.stderr
    if refused and token is None:
        raise SweeperError(f"--address {address}: the Ray cluster requires an auth token and this machine has none; "
                           f"{_TOKEN_HELP}")
    if refused:
        raise SweeperError(f"--address {address}: the Ray cluster refused the auth token from {token[0]}; "
                           f"use the head's token: {_TOKEN_HELP}")


def check_resources(opts: SweepOptions) -> None:
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
    line naming the file and the folder searched. Each (dataset, folder, checksum setting) is loaded
    once, as a trial loads it. ``download`` trials fetch their own files and are not checked.
    """
    from trainables.data import load_dataset

    seen: set[tuple[str, str, bool]] = set()
    for cfg in configs:
        name, folder = getattr(cfg, "dataset", None), getattr(cfg, "data_dir", None)
        if name is None or folder is None or getattr(cfg, "download", False):
            continue
        key = (name, str(folder), bool(getattr(cfg, "verify_checksums", True)))
        if key in seen:
            continue
        seen.add(key)
        try:
            load_dataset(*key)
        except SweeperError as e:
            raise SweeperError(f"{e} [dataset {name}, data_dir {folder}; a sweep file's relative data_dir is "
                               f"read from the file's folder]") from None


# ----------------------------------------------------------------------------- sweep folder metadata
def sweep_path(storage: str, name: str) -> str:
    return f"{storage}/{name}"


# ----------------------------------------------------------------------------- the trainable
def trainable(config: dict[str, Any]) -> None:
    """One trial inside Ray Tune: resume from Tune's checkpoint, train, log to MLflow, report.

    ``config["trial"]`` is the TrialConfig dict, ``config["sweep"]`` the tracking settings (kept in
    the param space so a restored Tuner has them). Imports stay inside: workers import on demand.
    """
    import logging
    import tempfile

    import torch
    from ray import tune

    from trainables.train import Trial

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one INFO line per checkpoint otherwise
    sweep = config["sweep"]
    if config["trial"].get("kind", "network") != "network":
        torch.set_num_threads(max(1, int(sweep["threads"])))
        return _closed_form_trial(config["trial"], sweep)
    cfg = TrialConfig.from_dict(config["trial"])
    torch.set_num_threads(cfg.threads)  # the config's count: the same numbers as `sweeper trial`
    tracker = tracking.TrialTracker(sweep["mlflow_uri"], sweep["experiment_id"], sweep["parent_run_id"],
                                    sweep["name"], cfg.to_dict(), tune.get_context().get_trial_id(),
                                    run_label(config["trial"], sweep.get("axes", [])),
                                    key_format=sweep.get("key_format", 1))
    if tracker.finished:  # it finished before an interrupt: never re-run, and report it only if Ray lacks it
        _report_stored_final(tracker, sweep)
        return
    try:
        trial = Trial(cfg)
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                trial.load(Path(d) / "trial.pt")
    except Exception as e:  # before training: the run is marked failed here, as train_tracked does later
        tracker.log_failure(e)
        _fail(e, tracker.key)
        raise
    if ckpt is not None and trial.done:  # only the final report carries a finished trial: Ray has it already
        return

    def report(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as d:
            trial.save(Path(d) / "trial.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    def after_epoch(metrics: dict[str, Any]) -> None:
        if not trial.done:  # the final report, below, carries the last epoch
            report({**metrics, "status": "running", "trial_key": tracker.key})

    try:
        result = tracking.train_tracked(trial, tracker, after_epoch)
    except Exception as e:
        _fail(e, tracker.key)
        raise
    report(_final_metrics(result, tracker))


def _fail(error: BaseException, key: str) -> None:
    """Before a trial's error propagates: a deterministic one (a :class:`SweeperError`: bad config or data)
    is reported as such, so :class:`NoRetry` stops Ray from retrying what would fail the same way again."""
    from ray import tune

    if isinstance(error, SweeperError):
        tune.report({"status": "failed", "error": f"{type(error).__name__}: {error}"[:2000], "trial_key": key,
                     "deterministic": 1})


def no_retry_callback():
    """A Tune callback: a trial that reported a deterministic error gets no retry (Ray retries every
    error up to ``max_failures``; node loss deserves it, a missing file or a bad config does not)."""
    from ray import tune

    class NoRetry(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("deterministic"):  # the error that follows this report ends the trial
                trial.max_failures = trial.run_metadata.num_failures

    return NoRetry()


def _closed_form_trial(trial: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Kernel and linear trials: one dense computation, logged and reported once."""
    from ray import tune

    from trainables import make_config, run_any

    cfg = make_config(trial)
    tracker = tracking.TrialTracker(sweep["mlflow_uri"], sweep["experiment_id"], sweep["parent_run_id"],
                                    sweep["name"], cfg.to_dict(), tune.get_context().get_trial_id(),
                                    run_label(trial, sweep.get("axes", [])), key_format=sweep.get("key_format", 1))
    if tracker.finished:
        _report_stored_final(tracker, sweep)
        return
    try:
        result = run_any(cfg)
        tracker.log_final(result)
    except Exception as e:
        tracker.log_failure(e)
        _fail(e, tracker.key)
        raise
    tune.report(_final_metrics(result, tracker))


def _final_metrics(result, tracker: tracking.TrialTracker) -> dict[str, Any]:
    """A trial's last report: final metrics, status, its MLflow run and the node it ran on."""
    import ray

    objectives = {"clean_acc": float("nan"), "asr": float("nan")}  # a diverged trial has none: NaN for searchers
    return {**objectives, **result.metrics, "status": result.status, "trial_key": tracker.key,
            "diverged": int(result.status == "diverged"), "mlflow_run_id": tracker.run_id or "",
            "node_id": ray.get_runtime_context().get_node_id()}


def _report_stored_final(tracker: tracking.TrialTracker, sweep: dict[str, Any]) -> None:
    """Report a finished trial's final result from MLflow, unless Ray's record already holds it.

    A trial can finish and be reported just before an interrupt that Ray's experiment state never
    saw: on resume Tune starts it again, and reporting once more would write its final line twice.
    """
    from ray import tune

    if not final_recorded(sweep, tune.get_context().get_trial_id(), tracker.key):
        tune.report(_stored_final(tracker))


def final_recorded(sweep: dict[str, Any], trial_id: str, key: str) -> bool:
    """Whether the trial's ``result.json`` in the sweep folder holds a final (not running) report."""
    from analysis.schema import read_text

    if "storage" not in sweep:  # sweeps started by an older version: report again, harmless
        return False
    text = read_text(sweep["storage"], f"{sweep['name']}/{trial_folder(trial_id)}/result.json") or ""
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a killed driver
            continue
        if rec.get("trial_key") == key and rec.get("status", "running") != "running":
            return True
    return False


def _stored_final(tracker: tracking.TrialTracker) -> dict[str, Any]:
    """The final report of a trial whose MLflow run already finished (from that run's metrics)."""
    import ray

    metrics = {"clean_acc": float("nan"), "asr": float("nan"), **tracker.final_metrics}
    return {**metrics, "status": tracker.final_status, "trial_key": tracker.key,
            "diverged": int(tracker.final_status == "diverged"), "mlflow_run_id": tracker.run_id or "",
            "node_id": ray.get_runtime_context().get_node_id()}


def _trainable_for(meta: SweepMeta):
    from ray import tune

    if meta.kind == "search":  # a defence holds no CPU: its models (Ray tasks) hold the trial resources
        from .defence import defence_trainable

        return tune.with_resources(defence_trainable, {"cpu": 0, "memory": 2**20})
    return tune.with_resources(trainable, {"cpu": meta.cpus_per_trial, "gpu": meta.gpus_per_trial})


def _sweep_settings(meta: SweepMeta) -> dict[str, Any]:
    keys = ("mlflow_uri", "experiment_id", "parent_run_id", "name")
    out = {**{k: getattr(meta, k) for k in keys}, "threads": max(1, int(meta.cpus_per_trial)),
           "axes": label_axes(meta), "storage": meta.storage, "key_format": meta.key_format}
    if meta.kind == "search":
        out.update(defence={k: meta.search[k] for k in ("threats", "seeds", "objectives", "threat_fields")},
                   cpus_per_model=meta.cpus_per_trial, gpus_per_model=meta.gpus_per_trial,
                   models_dir=str(Path(meta.storage) / meta.name / "models"))
    return out


def label_axes(meta: SweepMeta) -> list[str]:
    """The fields that tell a sweep's trials apart: its axes, and seed when seeds vary."""
    spec = meta.spec or {}
    axes = list(spec.get("axes", {}))
    if meta.kind == "search":  # a defence's seeds are part of it, not an axis
        return axes
    return axes + (["seed"] if spec.get("seeds") and "seed" not in axes else [])


# ----------------------------------------------------------------------------- Ray
def quiet_worker_exit() -> None:
    """Ray worker set-up: drop the "Exception ignored in ... SystemExit" that a worker prints when
    Ray's SIGTERM handler fires inside a garbage-collection callback at shutdown (it raises
    SystemExit there, which Python can only report). Every other unraisable error is still printed."""
    import sys

    default = sys.unraisablehook

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, SystemExit):
            default(unraisable)

    sys.unraisablehook = hook


def start_ray(address: str | None) -> None:
    """Join ``address`` or start a local Ray; trials keep the driver's working directory."""
    import ray

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 then prints nothing: our own progress lines report
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return
    if address not in (None, "local") and ray_auth_token() is not None and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"  # send the token a Ray >= 2.59 head demands
        from ray._raylet import Config

        Config.initialize("")  # Ray read its config when imported: make it see token mode
    env_vars = {"RAY_CHDIR_TO_TRIAL_DIR": "0"}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "SWEEPER_PLUGINS", "PYTHONPATH"):
        if os.environ.get(name):  # trials on other nodes log with the driver's tracking credentials and
            env_vars[name] = os.environ[name]  # import its plugins (trainables.plugins) from the same path
    if "PYTHONPATH" in env_vars:  # workers start elsewhere: relative entries would point nowhere
        env_vars["PYTHONPATH"] = os.pathsep.join(
            os.path.abspath(p) for p in env_vars["PYTHONPATH"].split(os.pathsep) if p)
    runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": "sweeper.orchestrate.quiet_worker_exit"}
    from . import logs

    logs.route()  # Ray's import gave its logger a stderr handler: its records go to the sweep's log instead
    # workers' output (their tracebacks too) stays in Ray's session logs unless --verbose: a failed trial's
    # own message is in the summary
    kwargs = dict(include_dashboard=False, configure_logging=False, log_to_driver=logs.verbose(),
                  runtime_env=runtime_env)
    try:
        if address in (None, "local"):
            ray.init(**kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SweeperError(f"--address {address}: cannot join the Ray cluster: {str(e).splitlines()[0]}") from None


def default_defences(meta: SweepMeta) -> int:
    """Defences in flight at once: enough models to fill every slot of the cluster, plus one defence
    so a straggling model never idles a slot; more would only make the search less adaptive."""
    import math

    import ray

    res = ray.cluster_resources()
    slots = res.get("CPU", 1) / max(meta.cpus_per_trial, 1e-9)
    if meta.gpus_per_trial:
        slots = min(slots, res.get("GPU", 0) / meta.gpus_per_trial)
    models = len(meta.search["threats"]) * len(meta.search["seeds"])
    return max(1, math.ceil(max(slots, 1) / models)) + 1


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
        print(f"sweeper: no node has {ask} yet; waiting for the autoscaler to start one (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        return
    have = "; ".join(f"{n.get('NodeManagerAddress', '?')}: {n.get('Resources', {}).get('CPU', 0):g} CPU, "
                     f"{n.get('Resources', {}).get('GPU', 0):g} GPU" for n in nodes) or "no live node"
    raise SweeperError(f"each trial asks for {ask} (--cpus-per-trial/--gpus-per-trial) but no node of the cluster "
                       f"has that ({have}) and no autoscaler node type could add one; ask for less, or join a "
                       f"cluster that has it (--address)")


def _node_types() -> list[dict[str, float]]:
    """Resources of each node type the cluster's autoscaler may start (empty: no autoscaler)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        return [dict(g.resources) for g in (config.node_group_configs if config else [])]
    except Exception:  # a private API: when it moves, the sweep behaves as on a fixed cluster
        return []


def default_gpus() -> float:
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _progress_callback(n_trials: int, axes: list[str], live: bool | None = None):
    """The sweep's progress without Tune's tables.

    On a terminal: one live bar (done / running / pending / failed, ETA from the finished trials)
    with a short line per finished trial, so hundreds of trials do not flood the screen. Otherwise
    (CI, logs): one plain line per trial epoch and per finished trial.
    """
    import sys

    from ray import tune

    live = sys.stdout.isatty() if live is None else live
    if live:
        stop_progress()

    def label(trial) -> str:  # the axes' values name a trial, as in the summary (Ray's ids are not shown)
        cfg = trial.config.get("trial", {})
        text = " ".join(f"{a}={_short(cfg.get(a))}" for a in axes)
        return text or str((trial.last_result or {}).get("trial_key") or trial.trial_id)

    def epoch_line(trial, result) -> str:
        return (f"{label(trial)} epoch {result.get('epoch')}/{trial.config['trial'].get('epochs')} "
                f"loss={result.get('train_loss', float('nan')):.3f} clean={result.get('clean_acc', float('nan')):.3f} "
                f"asr={result.get('asr', float('nan')):.3f}")

    def finished_line(trial) -> str:
        r = trial.last_result or {}
        head = f"{label(trial)} {r.get('status', '?')}: clean={r.get('clean_acc', float('nan')):.3f} asr={r.get('asr', float('nan')):.3f}"
        if "models_done" in r:  # a defence: its objectives aggregated over the threats
            return f"{head} over {r.get('n_models', '?')} models"
        return f"{head} max_overlap_sq={r.get('max_overlap_sq', float('nan')):.3f}"

    def error_line(trial) -> str:  # a deterministic error reported its message; any other is in Ray's folder
        msg = (trial.last_result or {}).get("error")
        return f"{label(trial)} failed: {msg}" if msg else f"{label(trial)} raised an error (see {trial.local_path})"

    class Plain(tune.Callback):
        def __init__(self):
            self.done: set[str] = set()

        def on_step_begin(self, iteration, trials, **info):
            # a resumed sweep's finished trials count from the first line on (the callback is restored empty)
            self.done |= {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("status") == "running" and "models_done" in result:
                print(f"[{len(self.done)}/{n_trials} done] {label(trial)}: {result['models_done']}/"
                      f"{result.get('n_models')} models trained", flush=True)
            elif result.get("status") == "running":
                print(f"[{len(self.done)}/{n_trials} done] {epoch_line(trial, result)}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            if "epoch" in r and r.get("status") != "running":  # the final report carries the last epoch
                print(f"[{len(self.done)}/{n_trials} done] {epoch_line(trial, r)}", flush=True)
            self.done.add(trial.trial_id)
            print(f"[{len(self.done)}/{n_trials} done] {finished_line(trial)}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[{len(self.done)}/{n_trials} done] {error_line(trial)}", flush=True)

    class Live(tune.Callback):
        def __init__(self):
            self.bar = None  # made on the first step: Tune pickles its callbacks, a live display cannot be

        def __getstate__(self):
            return {"bar": None}

        def _start(self):
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.console = Console()
            self.bar = Progress(TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[counts]}"), TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task("trials", total=n_trials, counts="")
            self.bar.start()
            _LIVE.append(self)

        def on_step_begin(self, iteration, trials, **info):
            if self.bar is None:
                self._start()
            by = {s: sum(t.status == s for t in trials) for s in ("TERMINATED", "RUNNING", "ERROR")}
            pending = n_trials - sum(by.values())
            self.bar.update(self.task, completed=by["TERMINATED"] + by["ERROR"],
                            counts=f"{by['RUNNING']} running, {pending} pending, {by['ERROR']} failed")

        def on_trial_complete(self, iteration, trials, trial, **info):
            if self.bar is not None:
                self.console.print(finished_line(trial))

        def on_trial_error(self, iteration, trials, trial, **info):
            if self.bar is not None:
                self.console.print(error_line(trial))

        def on_experiment_end(self, trials, **info):
            if self.bar is not None:
                self.on_step_begin(0, trials)  # the final counts
                self.bar.stop()

    return Live() if live else Plain()


def _short(value: Any) -> Any:
    """A value as a progress line shows it: floats to 4 significant digits (a search's kappa=122.96, not
    122.96071107325702)."""
    return f"{value:.4g}" if isinstance(value, float) else value


_LIVE: list[Any] = []  # live bars of the running tuner, stopped before the summary is printed


def stop_progress() -> None:
    """Stop any live progress bar (an interrupted tuner never calls ``on_experiment_end``)."""
    while _LIVE:
        _LIVE.pop().bar.stop()


def trial_folder(trial_id: str) -> str:
    """The folder of a trial in the sweep's Ray folder (Tune's dir and name creators, final_recorded)."""
    return f"trial_{trial_id}"


def _trial_dirname(trial) -> str:
    return trial_folder(trial.trial_id)


SAMPLERS = ("nsga2", "tpe", "gp", "random")


def make_sampler(name: str, seed: int, budget: int):
    """The Optuna sampler ``sweeper search --sampler NAME`` uses (the benchmark builds the same)."""
    import optuna

    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, budget // 3))
    # TPE and GP keep Optuna's 10 random start-up trials: with 3 (tried) both did worse than random
    # search on benchmarks/search_vs_grid.py; below 11 trials they *are* random search (same points)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise SweeperError(f"--sampler {name!r} is invalid: must be one of {', '.join(SAMPLERS)}")


def _searcher(meta: SweepMeta):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from analysis.defence import stored_objectives

    s = meta.search
    objectives = stored_objectives(s)
    from . import logs

    logs.route()  # Optuna's import gave its logger a stderr handler ("A new study created ...")
    storage = optuna.storages.RDBStorage(s["optuna_storage"])
    return OptunaSearch(metric=[o.metric for o in objectives], mode=[o.direction for o in objectives],
                        sampler=make_sampler(s["sampler"], s["seed"], s["budget"]), study_name=meta.name,
                        storage=storage)


def _tuner(meta: SweepMeta, configs: list[TrialConfig] | None, restore: str | None = None,
           errored: str = "restart", search_space: dict[str, Any] | None = None):
    from ray import tune

    if meta.kind == "search":  # Tune's state (and its searcher's) at most 2 s old, not 10 s or more:
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # a killed driver loses fewer proposals
    if restore is not None:
        return tune.Tuner.restore(restore, trainable=_trainable_for(meta), resume_unfinished=True,
                                  resume_errored=errored == "resume", restart_errored=errored == "restart")
    run_config = tune.RunConfig(
        name=meta.name, storage_path=meta.storage,
        failure_config=tune.FailureConfig(max_failures=meta.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        verbose=0,
        callbacks=[no_retry_callback()] + ([_progress_callback(meta.n_trials, label_axes(meta), meta.live)]
                                            if meta.verbose else []),
    )
    # reused actors keep torch and the dataset imported between trials: no per-trial process start
    names = {"trial_dirname_creator": _trial_dirname, "trial_name_creator": _trial_dirname, "reuse_actors": True}
    if search_space is not None:  # adaptive: Optuna proposes, Tune runs (no scheduler)
        tune_config = tune.TuneConfig(max_concurrent_trials=meta.max_concurrent, search_alg=_searcher(meta),
                                      num_samples=meta.search["budget"], **names)
        param_space = {"trial": search_space, "sweep": _sweep_settings(meta)}
    else:
        tune_config = tune.TuneConfig(max_concurrent_trials=meta.max_concurrent, num_samples=1, **names)
        param_space = {"trial": tune.grid_search([c.to_dict() for c in configs]), "sweep": _sweep_settings(meta)}
    return tune.Tuner(_trainable_for(meta), param_space=param_space, tune_config=tune_config, run_config=run_config)


# ----------------------------------------------------------------------------- entry points
@dataclass
class SweepReport:
    """What a sweep run or resume produced."""

    name: str
    path: str
    mlflow_uri: str
    experiment_id: str
    parent_run_id: str
    rows: list[dict[str, Any]]  # one per trial: config fields, final metrics, status
    counts: dict[str, int]
    varying: list[str] = dataclasses.field(default_factory=list)  # the fields that tell trials apart
    groups: list[str] | None = None  # one frontier per combination of these (None: the attack fields that vary)
    objectives: list[tuple[str, str]] | None = None  # the frontier's (metric, max|min); None: the trial kind's


def prepare(spec, opts: SweepOptions) -> tuple[list[TrialConfig], dict[str, Any]]:
    """Every check that can fail, before Ray: grid, name, storage, existing sweep, resources, MLflow."""
    check_resources(opts)
    _default_threads(spec, opts)
    configs = spec.configs() if isinstance(spec, SweepSpec) else spec.corner_configs()
    check_name(opts.name)
    storage = resolve_storage(opts.storage)
    if sweep_exists(storage, opts.name):
        raise SweeperError(f"sweep {opts.name!r} already exists in {storage}; continue it with "
                           f"`sweeper resume {opts.name}` or choose another --name (nothing was changed)")
    if opts.mlflow_uri is None and is_uri(storage):
        raise SweeperError(f"--storage {storage} is a URI: pass --mlflow-uri (the embedded SQLite store needs a local folder)")
    check_data(configs)
    uri = opts.mlflow_uri or tracking.default_uri(Path(storage))
    tracking.check_uri(uri)
    check_address(opts.address)
    meta = SweepMeta(name=opts.name, storage=storage, mlflow_uri=uri, spec=spec.to_dict(), n_trials=len(configs),
                     cpus_per_trial=opts.cpus_per_trial, gpus_per_trial=opts.gpus_per_trial,
                     max_concurrent=opts.max_concurrent, max_failures=opts.max_failures, address=opts.address,
                     verbose=opts.verbose, live=opts.live, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                     git_commit=tracking.git_commit(), driver=this_driver(), key_format=KEY_FORMAT)
    if isinstance(spec, SweepSpec):  # every trial the sweep owes, so none is ever silently dropped
        axes = label_axes(meta)
        meta.trials = [{"key": tracking.trial_key(d, meta.key_format), "point": {a: d.get(a) for a in axes}}
                       for d in (c.to_dict() for c in configs)]
    return configs, meta


def _default_threads(spec, opts: SweepOptions) -> None:
    """Network trials run with one torch thread per CPU they hold, unless the space sets ``threads``."""
    if getattr(spec, "kind", "network") != "network":
        return
    parts = (spec.axes, spec.fixed) if isinstance(spec, SweepSpec) else (spec.continuous, spec.categorical, spec.fixed)
    if not any("threads" in p for p in parts):
        spec.fixed["threads"] = max(1, int(opts.cpus_per_trial))


def run_sweep(spec: SweepSpec, opts: SweepOptions) -> SweepReport:
    """Validate everything, then run the grid on Ray Tune with MLflow tracking."""
    configs, meta = prepare(spec, opts)
    return _launch(meta, configs, spec, opts, None)


def run_search(spec, opts: SweepOptions, budget: int, sampler: str = "gp", seed: int = 0,
               seeds: str | None = None, objectives: str | None = None, aggregate: str | None = None) -> SweepReport:
    """Search defences against a fixed threat set: Optuna proposes a defence (through Ray Tune's
    OptunaSearch), the defence's models (every threat x seed) train in parallel, and its objectives
    are aggregated over threats (:mod:`analysis.defence`). ``budget`` counts defences.

    The study lives in ``<storage>/<name>/optuna.db`` and is restored with the sweep.
    """
    from analysis.defence import check_metrics, parse_objectives, threat_set

    from .defence import check_models, split_threats
    from .spaces import parse_seeds

    if sampler not in SAMPLERS:
        raise SweeperError(f"--sampler {sampler!r} is invalid: must be one of {', '.join(SAMPLERS)}")
    if budget < 1:
        raise SweeperError(f"--budget={budget} is invalid: must be >= 1")
    objs = parse_objectives(objectives, aggregate)
    check_metrics(objs)
    threats, defence = split_threats(spec)
    seed_list = parse_seeds(seeds) if seeds is not None else [int(defence.fixed.get("seed", 0))]
    configs, meta = prepare(defence, opts)
    threat_list = threat_set(threats)
    check_models(defence, threat_list, seed_list)
    if is_uri(meta.storage):
        raise SweeperError("sweeper search keeps its Optuna study in a local folder: --storage must be a path")
    meta.n_trials = budget
    meta.kind = "search"
    meta.spec = {"axes": {**defence.continuous, **defence.categorical}, **defence.to_dict(), "threats": threats,
                 "seeds": seed_list}
    study = Path(meta.storage) / opts.name / "optuna.db"
    meta.search = {"budget": budget, "sampler": sampler, "seed": seed, "optuna_storage": f"sqlite:///{study}",
                   "threats": threat_list, "seeds": seed_list, "objectives": [o.text() for o in objs],
                   "threat_fields": sorted(threats)}
    return _launch(meta, configs, defence, opts, defence.tune_space())


def _launch(meta, configs, spec, opts: SweepOptions, search_space) -> SweepReport:
    start_ray(opts.address)
    check_shared_storage(opts.address, meta.storage)  # every node sees --storage, before any trial
    if meta.gpus_per_trial is None:
        meta.gpus_per_trial = default_gpus()
    check_cluster_resources(meta.cpus_per_trial, meta.gpus_per_trial)  # before anything is written
    artifact_root = None if is_uri(meta.storage) or opts.mlflow_uri else Path(meta.storage) / "mlartifacts"
    meta.experiment_id = tracking.retry(
        lambda: tracking.ensure_experiment(meta.mlflow_uri, opts.name, artifact_root),
        "creating the experiment", fatal=True)
    params = {"n_trials": meta.n_trials, **(_flat_spec(spec) if isinstance(spec, SweepSpec) else
                                                {f"search.{k}": v for k, v in meta.spec["axes"].items()})}
    meta.parent_run_id = tracking.retry(
        lambda: tracking.start_parent(meta.mlflow_uri, meta.experiment_id, opts.name, params),
        "creating the sweep's parent run", fatal=True)
    if meta.kind == "search" and meta.max_concurrent is None:
        meta.max_concurrent = default_defences(meta)
    write_meta(meta.storage, opts.name, meta)
    _log_to_sweep(meta.storage, opts.name)
    try:
        grid = _tuner(meta, configs, search_space=search_space).fit()
    finally:
        stop_progress()
    return _finish(meta, grid)


def resume_sweep(name: str, storage: str = "./sweeps", errored: str = "restart",
                 address: str | None = None) -> SweepReport:
    """Continue an interrupted sweep: finished trials are kept, unfinished ones continue from
    their last epoch checkpoint, errored ones restart (``restart``), resume (``resume``) or stay (``skip``)."""
    from ray import tune

    if errored not in ("restart", "resume", "skip"):
        raise SweeperError(f"--errored {errored!r} is invalid: must be restart, resume or skip")
    check_name(name)
    storage = resolve_storage(storage)
    meta = read_meta(storage, name)
    if meta is None:
        raise SweeperError(f"no sweep {name!r} in {storage} (no {META}); start one with `sweeper run --name {name}`")
    path = sweep_path(storage, name)
    tracking.check_uri(meta.mlflow_uri)
    address = address if address is not None else meta.address
    check_address(address)
    meta.driver = this_driver()
    write_meta(storage, name, meta)
    _log_to_sweep(storage, name)
    start_ray(address)
    check_shared_storage(address, storage)  # every node sees --storage, before any trial
    check_cluster_resources(meta.cpus_per_trial, meta.gpus_per_trial)
    if not tune.Tuner.can_restore(path):
        raise SweeperError(f"sweep {name!r} in {storage} has no Ray Tune state to resume (it never started)")
    try:
        grid = _tuner(meta, None, restore=path, errored=errored).fit()
    finally:
        stop_progress()
    return _finish(meta, grid)


def _log_to_sweep(storage: str, name: str) -> None:
    """Library records (Ray, MLflow, Optuna) go to ``<sweep>/sweeper.log`` once the folder exists."""
    from analysis.schema import local_folder

    from . import logs

    folder = local_folder(storage, name)
    if folder is not None:
        logs.write_to(folder / "sweeper.log")


def _flat_spec(spec: SweepSpec) -> dict[str, Any]:
    out = {f"grid.{k}": ",".join(map(str, v)) for k, v in spec.axes.items()}
    out.update({f"fixed.{k}": v for k, v in spec.fixed.items()})
    if spec.seeds:
        out["seeds"] = ",".join(map(str, spec.seeds))
    return out


def _finish(meta: SweepMeta, grid) -> SweepReport:
    """Rows and counts of a sweep whose tuner returned, its parent run closed with the counts.

    Ray knows which trials raised and which stopped part-way; a trial's own MLflow run knows
    whether it finished (the trial writes that last, so it wins: a trial that finished after an
    interrupt but before Ray recorded it is completed, and a resume never re-runs it).
    """
    from analysis.defence import THREAT_FIELDS
    from analysis.results import CONFIG_FIELDS, pending_rows

    search = meta.kind == "search"
    stored = _mlflow_states(meta, "defence" if search else "trial")
    rows = []
    for res in grid:
        cfg = (res.config or {}).get("trial", {})
        if not cfg:  # never started (the sweep was interrupted first): counted as pending below
            continue
        metrics = {k: v for k, v in (res.metrics or {}).items() if k != "models_json"}
        if search:  # a defence: its own fields (the threats are in every row of its models)
            from .defence import defence_config

            key = metrics.get("trial_key") or tracking.trial_key(defence_config(cfg, meta.search), meta.key_format)
            cfg = {k: v for k, v in cfg.items() if k not in THREAT_FIELDS and k != "seed"}
        else:
            key = metrics.get("trial_key") or tracking.trial_key(_full_config(cfg), meta.key_format)
        run = stored.get(key)
        if run is not None and not (res.error is not None and run[0] == "running"):
            status = _tuner_returned(run[0])  # the trial's own record decides, as `sweeper status` reads it
            if status in tracking.FINAL_STATUSES:
                metrics = {**metrics, **run[1]}
        elif res.error is not None:  # it raised (and its retries too): failed, never "interrupted"
            status = "failed"
        else:
            status = "interrupted" if metrics.get("status") == "running" else metrics.get("status", "pending")
        error = error_text(res.error, metrics) if status == "failed" else ""
        metrics = {k: v for k, v in metrics.items() if k not in ("error", "deterministic")}
        row = {**trial_row(cfg, metrics, CONFIG_FIELDS), "trial_key": key, "status": status, "error": error}
        rows.append(row)
    seen = {r["trial_key"] for r in rows}
    owed = pending_rows(meta) if meta.trials is not None else pending_rows(meta)[len(rows):]  # a search owes a count
    rows += [r for r in owed if r["trial_key"] not in seen]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "diverged", "failed", "interrupted")}
    counts["pending"] = int(meta.n_trials) - sum(counts.values())
    counts["total"] = int(meta.n_trials)
    done = counts["completed"] + counts["diverged"] == counts["total"]
    if search and counts["interrupted"] == 0 and counts["pending"] == 0:  # nothing left for Tune to resume
        _close_orphans(meta)
    tracking.finish_parent(meta.mlflow_uri, meta.parent_run_id, "completed" if done else "incomplete",
                           {f"n_{k}": v for k, v in counts.items()})
    return SweepReport(meta.name, sweep_path(meta.storage, meta.name), meta.mlflow_uri,
                       meta.experiment_id, meta.parent_run_id, rows, counts, label_axes(meta),
                       summary_groups(meta), _objectives(meta))


def error_text(error: BaseException | None, metrics: dict[str, Any]) -> str:
    """A failed trial's own message: the one it reported, else the cause inside Ray's wrapper (whose
    first line is only ``ray::ImplicitFunc.train() (pid=...)``)."""
    if metrics.get("error"):
        return str(metrics["error"])[:300]
    if error is None:
        return ""
    cause = getattr(error, "cause", None) or error
    first = next((ln for ln in str(cause).splitlines() if ln.strip()), "")
    return f"{type(cause).__name__}: {first}"[:300]


def _close_orphans(meta: SweepMeta) -> None:
    """Mark FAIL the Optuna trials still RUNNING once the tuner returned: a driver killed after
    Optuna proposed a defence but before Tune saved its state leaves one behind (the restored
    searcher proposes again, and the defence's MLflow run and models are found by its key)."""
    import optuna

    study = optuna.load_study(study_name=meta.name, storage=meta.search["optuna_storage"])
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_system_attr(t._trial_id, "sweeper", "orphaned by an interrupted driver")
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)


def _objectives(meta: SweepMeta) -> list[tuple[str, str]] | None:
    """A search's objectives (metric, direction); None: the trial kind's."""
    if meta.kind != "search":
        return None
    from analysis.defence import stored_objectives

    return [(o.metric, o.direction) for o in stored_objectives(meta.search)]


def summary_groups(meta: SweepMeta) -> list[str] | None:
    """A search draws one frontier over its defences (the threats are aggregated in every row); a
    grid one per attack field that varies (None lets the analysis decide from the rows)."""
    return [] if meta.kind == "search" else None


def _tuner_returned(status: str) -> str:
    """A trial status once no driver runs it any more: a run still marked running was interrupted."""
    return trial_status(status, alive=False)


def _full_config(trial: dict[str, Any]) -> dict[str, Any]:
    from trainables import make_config

    return make_config(trial).to_dict()


def _mlflow_states(meta: SweepMeta, kind: str = "trial") -> dict[str, tuple[str, dict[str, float]]]:
    """trial key -> (status tag, final metrics) of the sweep's child runs (``kind`` 'defence': a
    search's defence runs); empty if MLflow is down."""
    from analysis.schema import trial_runs

    def _do():
        return {r.data.tags.get(tracking.TAG_KEY): (r.data.tags.get(tracking.TAG_STATUS, "running"), dict(r.data.metrics))
                for r in trial_runs(meta.mlflow_uri, meta.experiment_id, kind)}

    return tracking.retry(_do, "reading the trials' states", attempts=2) or {}


def sweep_status(name: str, storage: str = "./sweeps") -> dict[str, Any]:
    """Trials completed / diverged / failed / running / interrupted / pending of a sweep.

    Each trial's status is its MLflow run's, as in every other view; a trial still marked running
    whose driver process is gone counts as interrupted; a trial without a run yet is pending.
    """
    from analysis.schema import trial_statuses

    check_name(name)
    storage = resolve_storage(storage)
    meta = read_meta(storage, name)
    if meta is None:
        raise SweeperError(f"no sweep {name!r} in {storage}")
    tracking.check_uri(meta.mlflow_uri)
    kind = "defence" if meta.kind == "search" else "trial"  # a search owes defences
    states = trial_statuses(meta.mlflow_uri, meta.experiment_id, kind) if meta.experiment_id else {}
    if meta.trials is not None:  # a grid: only its own trials count (keys of other sweeps never do)
        states = {t["key"]: states[t["key"]] for t in meta.trials if t["key"] in states}
    by = {s: 0 for s in ("completed", "diverged", "failed", "running", "interrupted", "pending")}
    live = driver_alive(meta)
    for s in states.values():
        s = trial_status(s, live)  # the rule frontier and report apply too
        by[s] = by.get(s, 0) + 1
    by["pending"] = max(0, int(meta.n_trials) - len(states))
    by["total"] = meta.n_trials
    return {"name": name, "path": sweep_path(storage, name), "mlflow_uri": meta.mlflow_uri, **by}


def this_driver() -> dict[str, Any]:
    """Host and pid of this process, recorded as the sweep's driver (run and each resume)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}
