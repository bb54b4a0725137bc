"""The commands that launch or follow a sweep on Ray: ``run``, ``search``, ``plan``, ``resume``, ``status``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from .options import (
    GRID_FLAGS,
    SLURM_FLAGS,
    AddressOpt,
    AugmentAxis,
    CpusOpt,
    CpusPerNodeOpt,
    DatasetAxis,
    EpochsAxis,
    GpusOpt,
    GpusPerNodeOpt,
    Interrupted,
    KappaAxis,
    MaxConcurrentOpt,
    MaxFailuresOpt,
    MlflowOpt,
    ModelAxis,
    NameOpt,
    NodesOpt,
    PartitionOpt,
    PoisonModeAxis,
    QuietOpt,
    SbatchArgOpt,
    SeedsOpt,
    SetOpt,
    SlurmOpt,
    StorageOpt,
    SweeperError,
    SweepFailed,
    SweepFileOpt,
    SweepKindOpt,
    ThetaAxis,
    TimeOpt,
    TriggerAxis,
    VerboseOpt,
    app,
)


@app.command()
def run(
    theta: ThetaAxis = None,
    kappa: KappaAxis = None,
    augment: AugmentAxis = None,
    epochs: EpochsAxis = None,
    seeds: SeedsOpt = None,
    dataset: DatasetAxis = None,
    model: ModelAxis = None,
    trigger: TriggerAxis = None,
    poison_mode: PoisonModeAxis = None,
    sweep_file: SweepFileOpt = None,
    set_: SetOpt = None,
    kind: SweepKindOpt = None,
    name: NameOpt = None,
    storage: StorageOpt = "./sweeps",
    address: AddressOpt = None,
    cpus_per_trial: CpusOpt = 1.0,
    gpus_per_trial: GpusOpt = None,
    max_concurrent: MaxConcurrentOpt = None,
    mlflow_uri: MlflowOpt = None,
    max_failures: MaxFailuresOpt = 2,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    slurm: SlurmOpt = False,
    nodes: NodesOpt = 1,
    time: TimeOpt = None,
    partition: PartitionOpt = None,
    gpus_per_node: GpusPerNodeOpt = None,
    cpus_per_node: CpusPerNodeOpt = None,
    sbatch_arg: SbatchArgOpt = None,
) -> dict[str, Any]:
    """Run a grid sweep on Ray Tune, tracked in MLflow; prints the trials and the frontier.

    With no flags: theta in {0.05, 0.1} x kappa in {0, 200, 400, 800} on digits, 15 epochs.
    """
    params = dict(locals())  # what a SLURM job calls this function with
    from .. import logs
    from ..orchestrate import SweepOptions, prepare, run_sweep
    from ..spaces import build_spec

    logs.capture(verbose)
    job = _slurm_options(params)
    flags = {k: v for k, v in locals().items() if k in GRID_FLAGS}
    spec, file_name = build_spec(sweep_file, flags, seeds, set_, kind.value if kind else None)  # file < flags < --set
    from trainables import trial_kind

    default_name = trial_kind(spec.kind).demo_name
    opts = SweepOptions(
        name=name if name is not None else (file_name or default_name),  # "" is refused, not replaced
        storage=storage,
        address=address,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        max_concurrent=max_concurrent,
        mlflow_uri=mlflow_uri,
        max_failures=max_failures,
        verbose=0 if quiet else 1,
    )
    if job is not None:
        return _submit(
            run, "run", params, opts, job, lambda: prepare(spec, opts), f"sweep {opts.name}: {spec.describe()}"
        )
    if not quiet:  # the size before Ray starts (a surprise axis shows now, not hours later); never `sweep NAME:`,
        # the final summary's line that scripts parse
        typer.echo(f"launching sweep {opts.name}: {spec.describe()} on {_where(address)}")
    report = run_sweep(spec, opts)
    _report(report)
    return {"counts": report.counts, "rows": report.rows, "path": report.path}


def _slurm_options(params: dict[str, Any]):
    """The command's SLURM flags (None without --slurm); --address and --slurm exclude each other."""
    from ..slurm import slurm_options

    job = slurm_options(
        params["slurm"],
        params["nodes"],
        params["time"],
        params["partition"],
        params["gpus_per_node"],
        params["cpus_per_node"],
        params["sbatch_arg"],
    )
    if job is not None and params.get("address") is not None:
        raise SweeperError(f"--address {params['address']} and --slurm exclude each other: the job starts its own Ray")
    return job


def _submit(fn, command: str, params: dict[str, Any], opts, job, validate, what: str) -> dict[str, Any]:
    """``--slurm``: every check the command makes without it, then the job is written and submitted."""
    from analysis.schema import is_uri

    from ..preflight import resolve_storage
    from ..slurm import check_sbatch, cli_params, submit

    job.check()
    if is_uri(opts.storage):  # the job's script, its log and Ray's token live in the sweep folder
        raise SweeperError(
            f"--storage {opts.storage}: --slurm needs a folder every node mounts (the job's script and logs "
            "live in it), not a URI"
        )
    check_sbatch()
    validate()  # the sweep's own checks: nothing is submitted for a sweep that would fail them
    job.check(opts.cpus_per_trial, opts.gpus_per_trial)
    storage = resolve_storage(opts.storage)
    from .. import tracking

    tracking.create_store(opts.mlflow_uri or tracking.default_uri(Path(storage)))  # before jobs race to make it
    args = cli_params(fn, {**params, "storage": storage}, drop=(*SLURM_FLAGS, "address"))
    sub = submit(command, args, opts.name, storage, job)
    typer.echo(f"submitted SLURM job {sub.job_id}: {what} on {job.nodes} node{'s' if job.nodes > 1 else ''}")
    typer.echo(f"job script: {sub.script}\njob log: {sub.log}")
    typer.echo(f"follow it: sweeper status {opts.name} --storage {storage}")
    uri = opts.mlflow_uri or ""
    if job.nodes > 1 and (not uri or uri.startswith("sqlite:")):
        typer.echo(
            "note: trials on every node write to the embedded SQLite store on --storage; on a network filesystem "
            "(NFS) SQLite's locks are unreliable: pass --mlflow-uri http://HOST:5000 (a tracking server; README, "
            "'On a SLURM cluster')"
        )
    return {"job_id": sub.job_id, "script": str(sub.script), "log": str(sub.log)}


def _where(address: str | None) -> str:
    return "local Ray" if address is None else f"Ray at {address}"


def _search_size(spec, budget: int, seeds: str | None) -> str:
    """``budget 12 defences x 2 models each (theta x seed = 2 x 1) = up to 24 models`` (a bad space raises here)."""
    import math

    from ..defence_search import split_threats
    from ..spaces import parse_seeds

    threats, defence = split_threats(spec)
    counts = {k: len(v) for k, v in threats.items()}
    counts["seed"] = len(parse_seeds(seeds)) if seeds is not None else 1
    models = math.prod(counts.values())
    shape = f"({' x '.join(counts)} = {' x '.join(str(n) for n in counts.values())})"
    return (
        f"budget {budget} defence{'' if budget == 1 else 's'} x {models} model{'' if models == 1 else 's'} "
        f"each {shape} = up to {budget * models} models"
    )


def _report(report) -> None:
    from analysis.frontier import sweep_summary  # not analysis.report: no matplotlib for a printed table

    from ..ui import browse_lines

    typer.echo(f"\nsweep {report.name}: " + ", ".join(f"{v} {k}" for k, v in report.counts.items()))
    typer.echo(sweep_summary(report.rows, report.varying, report.groups, report.objectives))
    c = report.counts
    storage = report.path.rsplit("/", 1)[0]
    typer.echo(f"\nresults: {report.path}\nMLflow: {report.mlflow_uri} (experiment {report.name})")
    from .. import logs

    if logs.log_path() is not None:
        typer.echo(f"library log: {logs.log_path()} (Ray, MLflow, Optuna; --verbose prints it too)")
    for line in browse_lines(report.name, storage, report.mlflow_uri, report.experiment_id, report.parent_run_id):
        typer.echo(line)  # a tracking server: the runs table's link (not MLflow 3's GenAI overview); else `sweeper ui`
    resume = f"sweeper resume {report.name} --storage {storage}"
    if c["interrupted"] or c["pending"]:  # a script must see that the sweep did not finish: exit 130
        failed = f", {c['failed']} failed" if c["failed"] else ""
        raise Interrupted(
            f"sweep {report.name} not finished ({c['interrupted']} interrupted, {c['pending']} pending"
            f"{failed}): "
            f"continue with `{resume}` (finished trials are kept, interrupted ones continue "
            f"from their last epoch)"
        )
    if c["failed"]:
        raise SweepFailed(
            f"sweep {report.name}: {c['failed']} trial(s) failed (`sweeper report` lists their errors); "
            f"retry them from their last epoch with `{resume}`"
        )


class Sampler(str, Enum):
    nsga2 = "nsga2"
    tpe = "tpe"
    gp = "gp"
    random = "random"


class Aggregate(str, Enum):
    worst = "worst"
    mean = "mean"


@app.command()
def search(
    theta: Annotated[
        str,
        typer.Option(
            help="Threat: poison fraction(s), a value or a list a,b (every defence faces each); never a range."
        ),
    ] = "0.1",
    kappa: Annotated[
        str, typer.Option(help="Defence: penalty strength, log:LO:HI (log-uniform), LO:HI, a,b or a value.")
    ] = "log:10:1000",
    augment: AugmentAxis = None,
    epochs: Annotated[
        str | None, typer.Option(help="Defence: epochs, a value or a,b (categorical).", show_default=False)
    ] = None,
    dataset: DatasetAxis = None,
    model: ModelAxis = None,
    trigger: TriggerAxis = None,
    poison_mode: PoisonModeAxis = None,
    set_: SetOpt = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            help="Seeds per (defence, threat), averaged: N (0..N-1) or a list 0,3,7 \\[default: the config's seed].",
            show_default=False,
        ),
    ] = None,
    objectives: Annotated[
        str | None,
        typer.Option(
            help="METRIC:max|min[:worst|mean], comma-separated, aggregated over threats \\[default: clean_acc:max,asr:min].",
            show_default=False,
        ),
    ] = None,
    aggregate: Annotated[
        Aggregate | None,
        typer.Option(
            help="Combine the threats' values of every objective by worst case or mean \\[default: worst for asr, mean otherwise].",
            show_default=False,
        ),
    ] = None,
    budget: Annotated[
        int, typer.Option(help="Number of defences Optuna may try (each trains threats x seeds models).", min=1)
    ] = 12,
    sampler: Annotated[
        Sampler,
        typer.Option(
            help="Optuna sampler: gp (default: best once past its 10 random start-up defences, see benchmarks/search_vs_grid.py), nsga2, tpe or random."
        ),
    ] = Sampler.gp,
    seed: Annotated[int, typer.Option(help="Sampler seed.", min=0)] = 0,
    name: Annotated[
        str, typer.Option(help="Sweep name: folder, MLflow experiment and Optuna study.")
    ] = "digits-search",
    storage: StorageOpt = "./sweeps",
    address: AddressOpt = None,
    cpus_per_trial: CpusOpt = 1.0,
    gpus_per_trial: GpusOpt = None,
    max_concurrent: Annotated[
        int | None,
        typer.Option(
            help="Defences in flight at once \\[default: enough to fill the cluster's slots, plus one].",
            min=1,
            show_default=False,
        ),
    ] = None,
    mlflow_uri: MlflowOpt = None,
    max_failures: MaxFailuresOpt = 2,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    slurm: SlurmOpt = False,
    nodes: NodesOpt = 1,
    time: TimeOpt = None,
    partition: PartitionOpt = None,
    gpus_per_node: GpusPerNodeOpt = None,
    cpus_per_node: CpusPerNodeOpt = None,
    sbatch_arg: SbatchArgOpt = None,
) -> dict[str, Any]:
    """Search the defender's choices (kappa, augmentation, epochs, --set lr=...) against a fixed threat
    set (--theta, --trigger, --poison-mode as values or lists): each defence is trained against every
    threat, scored by mean clean accuracy and worst-case ASR, and the frontier is drawn over defences."""
    params = dict(locals())  # what a SLURM job calls this function with
    from .. import logs
    from ..orchestrate import SweepOptions, prepare_search, run_search
    from ..search_space import build_search_spec

    logs.capture(verbose)
    job = _slurm_options(params)
    flags = {
        "theta": theta,
        "kappa": kappa,
        "augment": augment,
        "epochs": epochs,
        "dataset": dataset,
        "model": model,
        "trigger": trigger,
        "poison_mode": poison_mode,
    }
    spec = build_search_spec(flags, set_)
    opts = SweepOptions(
        name=name,
        storage=storage,
        address=address,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        max_concurrent=max_concurrent,
        mlflow_uri=mlflow_uri,
        max_failures=max_failures,
        verbose=0 if quiet else 1,
    )
    how = dict(
        budget=budget,
        sampler=sampler.value,
        seed=seed,
        seeds=seeds,
        objectives=objectives,
        aggregate=aggregate.value if aggregate else None,
    )
    if job is not None:
        return _submit(
            search,
            "search",
            params,
            opts,
            job,
            lambda: prepare_search(spec, opts, **how),
            f"search {name}: {_search_size(spec, budget, seeds)}",
        )
    if not quiet:
        typer.echo(f"launching search {name}: {_search_size(spec, budget, seeds)} on {_where(address)}")
    report = run_search(spec, opts, **how)
    _report(report)
    return {"counts": report.counts, "rows": report.rows, "path": report.path}


@app.command()
def plan(
    theta: ThetaAxis = None,
    kappa: KappaAxis = None,
    augment: AugmentAxis = None,
    epochs: EpochsAxis = None,
    seeds: SeedsOpt = None,
    dataset: DatasetAxis = None,
    model: ModelAxis = None,
    trigger: TriggerAxis = None,
    poison_mode: PoisonModeAxis = None,
    sweep_file: SweepFileOpt = None,
    set_: SetOpt = None,
    kind: SweepKindOpt = None,
    concurrency: Annotated[int, typer.Option(help="Trials at once, for the wall-clock estimate.", min=1)] = 2,
    storage: StorageOpt = "./sweeps",
    mlflow_uri: Annotated[
        str | None,
        typer.Option(
            help="Store whose finished trials calibrate the estimate (an embedded sqlite:/// store) \\[default: <storage>/mlflow.db when it exists].",
            show_default=False,
        ),
    ] = None,
) -> dict[str, Any]:
    """Print the grid size, every trial and its CPU cost, without running anything: measured on the store's
    finished trials of the same model and dataset where it has them, else a rough model."""
    import pandas as pd

    from ..costs import plan_costs, store_uri
    from ..spaces import build_spec

    flags = {k: v for k, v in locals().items() if k in GRID_FLAGS}
    spec, _ = build_spec(sweep_file, flags, seeds, set_, kind.value if kind else None)
    configs = spec.configs()
    varying = list(spec.axes) + (["seed"] if spec.seeds else [])
    uri = store_uri(storage, mlflow_uri)
    cost, sources, n_measured = plan_costs(configs, uri)
    df = pd.DataFrame([{k: c.to_dict()[k] for k in varying} for c in configs])
    df["est_seconds"] = cost
    df["source"] = sources
    typer.echo(f"{len(configs)} trials; fixed: " + ", ".join(f"{k}={v}" for k, v in spec.fixed.items()))
    typer.echo(df.to_string(index=True, float_format=lambda v: f"{v:.3g}"))
    total = sum(cost)
    calibrated = sum(s != "model" for s in sources)
    where = (
        f"{calibrated} of {len(configs)} trials measured on {n_measured} finished trials in {uri}"
        if calibrated
        else "rough model"
        + (f"; {uri} has no finished trial of this model and dataset" if uri else "; no store to calibrate from")
    )
    typer.echo(
        f"cost on CPU: {total / 60:.1f} trial-minutes, ~{total / 60 / concurrency:.1f} min at "
        f"concurrency {concurrency} ({where}; a GPU is typically 10-50x faster for preresnet)"
    )
    return {"n_trials": len(configs), "est_seconds": total, "sources": sources}


@app.command()
def resume(
    name: Annotated[str, typer.Argument(help="Sweep name (a folder under --storage).")],
    storage: StorageOpt = "./sweeps",
    errored: Annotated[
        str, typer.Option(help="Trials that raised: restart (from scratch), resume (from their checkpoint) or skip.")
    ] = "resume",
    address: AddressOpt = None,
    verbose: VerboseOpt = False,
    slurm: SlurmOpt = False,
    nodes: NodesOpt = 1,
    time: TimeOpt = None,
    partition: PartitionOpt = None,
    gpus_per_node: GpusPerNodeOpt = None,
    cpus_per_node: CpusPerNodeOpt = None,
    sbatch_arg: SbatchArgOpt = None,
) -> dict[str, Any]:
    """Continue an interrupted sweep: nothing finished is re-run, unfinished trials continue from their last epoch."""
    params = dict(locals())  # what a SLURM job calls this function with
    from .. import logs
    from ..orchestrate import check_resumable, resume_sweep

    logs.capture(verbose)
    job = _slurm_options(params)
    if job is not None:
        from ..orchestrate import SweepOptions
        from ..preflight import check_name, resolve_storage
        from ..slurm import unstarted_job

        check_name(name)
        opts = SweepOptions(name=name, storage=storage)
        first = unstarted_job(resolve_storage(storage), name)
        if first is not None:  # its first job ended before the sweep started: submit that command again
            opts.cpus_per_trial = first["params"].get("cpus_per_trial") or 1.0
            opts.gpus_per_trial = first["params"].get("gpus_per_trial")
            opts.mlflow_uri = first["params"].get("mlflow_uri")
            fn = {"run": run, "search": search}[first["command"]]
            return _submit(fn, first["command"], first["params"], opts, job, lambda: None, f"sweep {name}")

        def validate():
            meta = check_resumable(name, storage, errored)
            opts.cpus_per_trial, opts.gpus_per_trial = meta.cpus_per_trial, meta.gpus_per_trial
            opts.mlflow_uri = meta.mlflow_uri

        return _submit(resume, "resume", params, opts, job, validate, f"resume of sweep {name}")
    report = resume_sweep(name, storage, errored=errored, address=address)
    _report(report)
    return {"counts": report.counts, "rows": report.rows}


@app.command()
def status(
    name: Annotated[str, typer.Argument(help="Sweep name (a folder under --storage).")],
    storage: StorageOpt = "./sweeps",
) -> dict[str, Any]:
    """Trials completed / diverged / failed / running / interrupted / pending of a sweep."""
    from ..preflight import check_name, resolve_storage
    from ..slurm import status_line
    from ..states import sweep_status

    check_name(name)
    job = status_line(Path(resolve_storage(storage)) / name)  # a sweep submitted with --slurm: its job's state
    try:
        st = sweep_status(name, storage)
    except SweeperError:
        if job is None:
            raise
        typer.echo(f"sweep {name}: not started yet; {job}")  # the job has not run yet (or failed before the sweep)
        return {"name": name, "slurm": job}
    typer.echo(
        f"sweep {st['name']} ({st['path']}): "
        + ", ".join(
            f"{st[k]} {k}" for k in ("completed", "diverged", "failed", "running", "interrupted", "pending", "total")
        )
    )
    if job is not None:
        typer.echo(job)
    return {**st, "slurm": job}


@app.command("slurm-job", hidden=True)
def slurm_job(
    name: Annotated[str, typer.Argument(help="Sweep name (a folder under --storage).")],
    storage: StorageOpt = "./sweeps",
) -> None:
    """Inside a sweep's SLURM job (its job.sbatch runs this): Ray on the job's nodes, then the submitted
    command, or resume once the sweep has started; a requeue when SLURM warns of the job's end."""
    from .. import logs
    from ..orchestrate import start_ray
    from ..slurm import restore_params, run_job

    logs.capture(False)

    def command(info: dict[str, Any], address: str, started: bool) -> None:
        if started or info["command"] == "resume":  # a requeued job, or `sweeper resume --slurm`
            errored = info["params"].get("errored", "resume") if info["command"] == "resume" else "resume"
            resume(name=name, storage=storage, errored=errored, address=address)
            return
        fn = {"run": run, "search": search}[info["command"]]
        fn(**restore_params(fn, info["params"]), address=address)

    run_job(name, storage, command, join=start_ray)
