"""Ray Tune orchestration: one place builds the Tuner, runs, resumes and summarises sweeps.

A sweep lives in ``<storage>/<name>/``: Ray Tune's experiment folder (trial checkpoints,
results) plus our ``sweeper.json`` (the search space, the MLflow URI, experiment and parent run
ids, resources) which makes ``sweeper resume NAME`` and ``sweeper status NAME`` possible.
Trials checkpoint every epoch through :class:`trainables.training.train.Trial`, so an interrupted trial
continues from its last epoch and a finished one is never re-run.

Its parts: :mod:`.preflight` (every check before Ray starts), :mod:`.worker` (what runs inside Ray
workers), :mod:`.sweep_progress`, :mod:`.samplers` and :mod:`.states` (what each trial ended as).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from analysis.schema import is_uri, read_meta, sweep_exists, write_meta
from trainables import record
from trainables.config import SweeperError, TrialConfig
from trainables.record import KEY_FORMAT, META, SweepMeta

from . import slurm, tracking
from .cluster import check_shared_storage
from .preflight import (
    check_address,
    check_cluster_resources,
    check_data,
    check_name,
    check_resources,
    ray_auth_token,
    resolve_storage,
)
from .samplers import SAMPLERS, searcher
from .spaces import SweepSpec
from .states import SweepReport, finish_sweep, label_axes, sweep_path, this_driver
from .sweep_progress import progress_callback, stop_progress
from .worker import no_retry_callback, trainable, trial_folder


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


def _trainable_for(meta: SweepMeta):
    from ray import tune

    if meta.kind == "search":  # a defence holds no CPU: its models (Ray tasks) hold the trial resources
        from .defence_search import defence_trainable

        return tune.with_resources(defence_trainable, {"cpu": 0, "memory": 2**20})
    return tune.with_resources(trainable, {"cpu": meta.cpus_per_trial, "gpu": meta.gpus_per_trial})


def _sweep_settings(meta: SweepMeta) -> dict[str, Any]:
    keys = ("mlflow_uri", "experiment_id", "parent_run_id", "name")
    out = {
        **{k: getattr(meta, k) for k in keys},
        "threads": max(1, int(meta.cpus_per_trial)),
        "axes": label_axes(meta),
        "storage": meta.storage,
        "key_format": meta.key_format,
    }
    if meta.kind != "search":  # its trials' runs are logged by the driver (run_logger), not by the workers
        out["driver_logs"] = True
    if meta.kind == "search":
        out.update(
            defence={k: meta.search[k] for k in ("threats", "seeds", "objectives", "threat_fields")},
            cpus_per_model=meta.cpus_per_trial,
            gpus_per_model=meta.gpus_per_trial,
            models_dir=str(Path(meta.storage) / meta.name / "models"),
        )
    return out


class RayStart(NamedTuple):
    """What :func:`start_ray` started a Ray for: the next sweep in the process reuses it when all three match."""

    target: str  # "local", the address joined, or "RAY_ADDRESS=..." (joined through the environment)
    worker_env: tuple[tuple[str, str], ...]
    log_to_driver: bool


_started: tuple[str, RayStart] | None = None  # (its GCS address, what for): a Ray at another address is the caller's


def ray_started_here() -> RayStart | None:
    """What the running Ray was started for, when :func:`start_ray` started it; None when Ray is not running or
    is the caller's own."""
    import ray

    if _started is None or not ray.is_initialized() or ray.get_runtime_context().gcs_address != _started[0]:
        return None
    return _started[1]


# A new local Ray prestarts one idle worker per CPU for the driver's tasks (~0.4 CPU-s each); a sweep runs no
# tasks there, and Tune's trial actors start workers of their own, so those stay idle until Ray stops.
NO_PRESTART = {"prestart_worker_first_driver": False, "enable_worker_prestart": False}


def start_ray(address: str | None) -> None:
    """Join ``address`` or start a local Ray; trials keep the driver's working directory.

    Called again in one process (sweeps from Python, one after another) it keeps the Ray it started when
    that Ray was started for the same address, worker environment and log routing (a Ray start costs
    seconds), and starts a new one otherwise; a Ray the caller initialised is used as it is.
    """
    global _started
    import ray

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 then prints nothing: our own progress lines report
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from . import logs

    joins_env = address is None and bool(os.environ.get("RAY_ADDRESS"))  # ray.init() joins RAY_ADDRESS
    target = "RAY_ADDRESS=" + os.environ["RAY_ADDRESS"] if joins_env else address or "local"
    env_vars = _worker_env()
    wanted = RayStart(target, tuple(sorted(env_vars.items())), logs.verbose())
    if ray.is_initialized():
        mine = ray_started_here()
        if mine is None or mine == wanted:  # the caller's own, or ours started alike
            return
        ray.shutdown()  # ours, for another address or worker environment: its workers would not match
    _started = None
    if address not in (None, "local") and ray_auth_token() is not None and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"  # send the token a Ray >= 2.59 head demands
        from ray._raylet import Config

        Config.initialize("")  # Ray read its config when imported: make it see token mode
    runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": "sweeper.worker.quiet_worker_exit"}
    logs.route()  # Ray's import gave its logger a stderr handler: its records go to the sweep's log instead
    # workers' output (their tracebacks too) stays in Ray's session logs unless --verbose: a failed trial's
    # own message is in the summary
    kwargs = dict(
        include_dashboard=False, configure_logging=False, log_to_driver=wanted.log_to_driver, runtime_env=runtime_env
    )
    try:
        if joins_env:
            ray.init(**kwargs)  # joins RAY_ADDRESS, as Ray documents
        else:
            # "local" is a new local instance, always: a bare ray.init() joins whatever
            # /tmp/ray/ray_current_cluster names, and a stale file (a head killed without `ray stop`) left it
            # waiting on a dead GCS for minutes
            local = {"_system_config": NO_PRESTART} if target == "local" else {}
            ray.init(address=target, **kwargs, **local)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SweeperError(f"--address {address}: cannot join the Ray cluster: {str(e).splitlines()[0]}") from None
    _started = (ray.get_runtime_context().gcs_address, wanted)


def _worker_env() -> dict[str, str]:
    """The environment every trial worker gets from the driver."""
    env_vars = {"RAY_CHDIR_TO_TRIAL_DIR": "0"}
    for name in (
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "SWEEPER_PLUGINS",
        "PYTHONPATH",
    ):
        if os.environ.get(name):  # trials on other nodes log with the driver's tracking credentials and
            env_vars[name] = os.environ[name]  # import its plugins (trainables.plugins) from the same path
    if "PYTHONPATH" in env_vars:  # workers start elsewhere: relative entries would point nowhere
        env_vars["PYTHONPATH"] = os.pathsep.join(
            os.path.abspath(p) for p in env_vars["PYTHONPATH"].split(os.pathsep) if p
        )
    return env_vars


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


def default_gpus() -> float:
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _trial_dirname(trial) -> str:
    return trial_folder(trial.trial_id)


def _tuner(
    meta: SweepMeta,
    configs: list[TrialConfig] | None,
    restore: str | None = None,
    errored: str = "restart",
    search_space: dict[str, Any] | None = None,
):
    from ray import tune

    from .run_logger import RunLogger

    if meta.kind == "search":  # Tune's state (and its searcher's) at most 2 s old, not 10 s or more:
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # a killed driver loses fewer proposals
    if restore is not None:
        return tune.Tuner.restore(
            restore,
            trainable=_trainable_for(meta),
            resume_unfinished=True,
            resume_errored=errored == "resume",
            restart_errored=errored == "restart",
        )
    settings = _sweep_settings(meta)
    run_config = tune.RunConfig(
        name=meta.name,
        storage_path=meta.storage,
        failure_config=tune.FailureConfig(max_failures=meta.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        verbose=0,
        callbacks=[no_retry_callback(), tune.logger.JsonLoggerCallback(), tune.logger.CSVLoggerCallback()]
        + ([RunLogger(settings)] if settings.get("driver_logs") else [])
        + ([progress_callback(meta.n_trials, label_axes(meta), meta.live)] if meta.verbose else []),
    )
    # reused actors keep torch and the dataset imported between trials: no per-trial process start
    names = {"trial_dirname_creator": _trial_dirname, "trial_name_creator": _trial_dirname, "reuse_actors": True}
    if search_space is not None:  # adaptive: Optuna proposes, Tune runs (no scheduler)
        tune_config = tune.TuneConfig(
            max_concurrent_trials=meta.max_concurrent,
            search_alg=searcher(meta),
            num_samples=meta.search["budget"],
            **names,
        )
        param_space = {"trial": search_space, "sweep": settings}
    else:
        from .stopping import EpochBoundaryStop

        # FIFO; on SLURM's warning (stopping.request) it pauses each trial at its next epoch's checkpoint
        tune_config = tune.TuneConfig(
            max_concurrent_trials=meta.max_concurrent, num_samples=1, scheduler=EpochBoundaryStop(), **names
        )
        param_space = {"trial": tune.grid_search([c.to_dict() for c in configs]), "sweep": settings}
    return tune.Tuner(_trainable_for(meta), param_space=param_space, tune_config=tune_config, run_config=run_config)


def fit(meta: SweepMeta, tuner):
    """Run ``tuner`` (:func:`_tuner`'s) with the result loggers its sweep was made with (``SweepMeta.tune_loggers``).

    Tune reads its switch for the loggers it adds from the environment when ``fit`` starts; it is set for this
    call only, so a Tuner of the caller's own, later in the process, gets Tune's usual loggers.
    """
    name, before = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")
    os.environ[name] = "1" if meta.tune_loggers == "json-csv" else "0"
    try:
        return tuner.fit()
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def prepare(spec, opts: SweepOptions) -> tuple[list[TrialConfig], dict[str, Any]]:
    """Every check that can fail, before Ray: grid, name, storage, existing sweep, resources, MLflow."""
    check_resources(opts)
    _default_threads(spec, opts)
    configs = spec.checked_configs()
    check_name(opts.name)
    storage = resolve_storage(opts.storage)
    in_job = slurm.starting_in_job(storage, opts.name)  # the sweep's SLURM job, in the folder made for it
    if sweep_exists(storage, opts.name) and not in_job:
        slurm.check_unstarted(storage, opts.name)  # submitted to SLURM, never started: say how to submit again
        raise SweeperError(
            f"sweep {opts.name!r} already exists in {storage}; continue it with "
            f"`sweeper resume {opts.name}` or choose another --name (nothing was changed)"
        )
    if opts.mlflow_uri is None and is_uri(storage):
        raise SweeperError(
            f"--storage {storage} is a URI: pass --mlflow-uri (the embedded SQLite store needs a local folder)"
        )
    check_data(configs)
    uri = opts.mlflow_uri or tracking.default_uri(Path(storage))
    tracking.check_uri(uri)
    check_address(opts.address)
    meta = SweepMeta(
        name=opts.name,
        storage=storage,
        mlflow_uri=uri,
        spec=spec.to_dict(),
        n_trials=len(configs),
        cpus_per_trial=opts.cpus_per_trial,
        gpus_per_trial=opts.gpus_per_trial,
        max_concurrent=opts.max_concurrent,
        max_failures=opts.max_failures,
        address=opts.address,
        verbose=opts.verbose,
        live=opts.live,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        git_commit=tracking.git_commit(),
        driver=this_driver(),
        key_format=KEY_FORMAT,
        slurm_job=os.environ.get("SLURM_JOB_ID") if in_job else None,
        tune_loggers="json-csv",
    )
    if spec.owes_every_trial:  # every trial the sweep owes, so none is ever silently dropped
        axes = label_axes(meta)
        meta.trials = [
            {"key": record.trial_key(d, meta.key_format), "point": {a: d.get(a) for a in axes}}
            for d in (c.to_dict() for c in configs)
        ]
    return configs, meta


def _default_threads(spec, opts: SweepOptions) -> None:
    """Trials with a ``threads`` field run with one torch thread per CPU they hold, unless the space sets it."""
    from .spaces import fields_for

    if "threads" in fields_for(spec.kind) and not spec.gives("threads"):
        spec.fixed["threads"] = max(1, int(opts.cpus_per_trial))


def run_sweep(spec: SweepSpec, opts: SweepOptions) -> SweepReport:
    """Validate everything, then run the grid on Ray Tune with MLflow tracking."""
    configs, meta = prepare(spec, opts)
    return _launch(meta, configs, spec, opts, None)


def run_search(
    spec,
    opts: SweepOptions,
    budget: int,
    sampler: str = "gp",
    seed: int = 0,
    seeds: str | None = None,
    objectives: str | None = None,
    aggregate: str | None = None,
) -> SweepReport:
    """Search defences against a fixed threat set: Optuna proposes a defence (through Ray Tune's
    OptunaSearch), the defence's models (every threat x seed) train in parallel, and its objectives
    are aggregated over threats (:mod:`analysis.defence_table`). ``budget`` counts defences.

    The study lives in ``<storage>/<name>/optuna.db`` and is restored with the sweep.
    """
    configs, meta, defence = prepare_search(spec, opts, budget, sampler, seed, seeds, objectives, aggregate)
    return _launch(meta, configs, defence, opts, defence.tune_space())


def prepare_search(
    spec,
    opts: SweepOptions,
    budget: int,
    sampler: str = "gp",
    seed: int = 0,
    seeds: str | None = None,
    objectives: str | None = None,
    aggregate: str | None = None,
):
    """Every check :func:`run_search` makes before Ray: (configs, meta, the defence's space)."""
    from trainables.record import check_metrics, parse_objectives, threat_set

    from .defence_search import check_models, split_threats
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
    # the threats may name the data (--dataset is an attack field): every model's files, before Ray
    check_data(TrialConfig.from_dict({**c.to_dict(), **t, "seed": seed_list[0]}) for c in configs for t in threat_list)
    if is_uri(meta.storage):
        raise SweeperError("sweeper search keeps its Optuna study in a local folder: --storage must be a path")
    meta.n_trials = budget
    meta.kind = "search"
    meta.spec = {
        "axes": {**defence.continuous, **defence.categorical},
        **defence.to_dict(),
        "threats": threats,
        "seeds": seed_list,
    }
    study = Path(meta.storage) / opts.name / "optuna.db"
    meta.search = {
        "budget": budget,
        "sampler": sampler,
        "seed": seed,
        "optuna_storage": f"sqlite:///{study}",
        "threats": threat_list,
        "seeds": seed_list,
        "objectives": [o.text() for o in objs],
        "threat_fields": sorted(threats),
    }
    return configs, meta, defence


def _launch(meta, configs, spec, opts: SweepOptions, search_space) -> SweepReport:
    start_ray(opts.address)
    check_shared_storage(opts.address, meta.storage)  # every node sees --storage, before any trial
    if meta.gpus_per_trial is None:
        meta.gpus_per_trial = default_gpus()
    check_cluster_resources(meta.cpus_per_trial, meta.gpus_per_trial)  # before anything is written
    artifact_root = None if is_uri(meta.storage) or opts.mlflow_uri else Path(meta.storage) / "mlartifacts"
    tracking.create_store(meta.mlflow_uri)  # a new embedded store from the empty one kept for this MLflow
    meta.experiment_id = tracking.retry(
        lambda: tracking.ensure_experiment(meta.mlflow_uri, opts.name, artifact_root),
        "creating the experiment",
        fatal=True,
    )
    params = {"n_trials": meta.n_trials, **spec.params()}
    meta.parent_run_id = tracking.retry(
        lambda: tracking.start_parent(meta.mlflow_uri, meta.experiment_id, opts.name, params),
        "creating the sweep's parent run",
        fatal=True,
    )
    if meta.kind == "search" and meta.max_concurrent is None:
        meta.max_concurrent = default_defences(meta)
    write_meta(meta.storage, opts.name, meta)
    _log_to_sweep(meta.storage, opts.name)
    try:
        grid = fit(meta, _tuner(meta, configs, search_space=search_space))
    finally:
        stop_progress()
    return finish_sweep(meta, grid)


def resume_sweep(
    name: str, storage: str = "./sweeps", errored: str = "restart", address: str | None = None
) -> SweepReport:
    """Continue an interrupted sweep: finished trials are kept, unfinished ones continue from
    their last epoch checkpoint, errored ones restart (``restart``), resume (``resume``) or stay (``skip``)."""
    from ray import tune

    meta = check_resumable(name, storage, errored)
    storage = resolve_storage(storage)
    path = sweep_path(storage, name)
    if address is None and meta.slurm_job and not os.environ.get("SLURM_JOB_ID"):
        raise SweeperError(
            f"sweep {name!r} ran in SLURM job {meta.slurm_job}, whose Ray is gone: resume it with "
            f"`sweeper resume {name} --storage {storage} --slurm`, or on this machine with --address local"
        )
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
    if meta.kind != "search":
        from .run_logger import write_finished

        write_finished(_sweep_settings(meta))  # its workers hold no MLflow client: what finished, before they start
    try:
        grid = fit(meta, _tuner(meta, None, restore=path, errored=errored))
    finally:
        stop_progress()
    return finish_sweep(meta, grid)


def check_resumable(name: str, storage: str, errored: str = "restart") -> SweepMeta:
    """Every check ``resume`` makes before Ray: the name, the sweep's ``sweeper.json``, its store, and no
    SLURM job of the sweep still pending or running (but the one calling this)."""
    if errored not in ("restart", "resume", "skip"):
        raise SweeperError(f"--errored {errored!r} is invalid: must be restart, resume or skip")
    check_name(name)
    storage = resolve_storage(storage)
    meta = read_meta(storage, name)
    if meta is None:
        if not is_uri(storage):
            slurm.check_unstarted(storage, name)
        raise SweeperError(f"no sweep {name!r} in {storage} (no {META}); start one with `sweeper run --name {name}`")
    tracking.check_uri(meta.mlflow_uri)
    if not is_uri(storage):
        active = slurm.active_job(Path(storage) / name)
        if active is not None and active[0] != os.environ.get("SLURM_JOB_ID"):
            raise SweeperError(
                f"sweep {name!r} is in SLURM job {active[0]} ({active[1]}): wait for it to end, or `scancel {active[0]}`"
            )
    return meta


def _log_to_sweep(storage: str, name: str) -> None:
    """Library records (Ray, MLflow, Optuna) go to ``<sweep>/sweeper.log`` once the folder exists."""
    from analysis.schema import local_folder

    from . import logs

    folder = local_folder(storage, name)
    if folder is not None:
        logs.write_to(folder / "sweeper.log")
