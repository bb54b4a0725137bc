"""The ``sweeper`` command line: a thin Typer layer over the library.

Every command is a plain function usable from Python. Bad input of any kind (a flag, a
config file, a dataset file, a checkpoint) ends in one line on stderr and exit code 2,
before any training starts; :func:`main` is the only place that catches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

try:  # typer >= 0.20 vendors its own click; its exceptions are the ones raised
    from typer._click import core as _click_core
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover - older typer on real click
    from click import core as _click_core
    from click import exceptions as _click_exc

from trainables import TRIAL_KINDS, load_plugins
from trainables.config import DATASETS, POISON_MODES, SweeperError, TrialConfig
from trainables.models import model_syntax
from trainables.penalty import PENALTIES
from trainables.triggers import TRIGGERS

# plugins (SWEEPER_PLUGINS, entry points) register before the choices and help below read the registries;
# a bad one is reported by main(): one line, exit 2
with contextlib.suppress(SweeperError):
    load_plugins()

app = typer.Typer(
    name="sweeper",
    help="Sweep data-poisoning trials (poison fraction x gradient penalty x augmentation x epochs), "
    "track them in MLflow and draw the safety-efficacy frontier.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_D = {f.name: f.default for f in dataclasses.fields(TrialConfig)}

DatasetName = Enum("DatasetName", {k.replace("-", "_"): k for k in DATASETS}, type=str)


class PoisonMode(str, Enum):
    stochastic = "stochastic"
    deterministic = "deterministic"


class HessianSplit(str, Enum):
    auto = "auto"
    clean_train = "clean-train"
    poisoned_train = "poisoned-train"
    test = "test"


class HessianMethod(str, Enum):
    auto = "auto"
    exact = "exact"
    gram_lanczos = "gram-lanczos"
    double_backward = "double-backward"
    gauss_newton = "gauss-newton"


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"


Kind = Enum("Kind", {k: k for k in TRIAL_KINDS}, type=str)  # the trial-kind registry

# Help texts that list a registry's names are read again by every call of main(), so a trigger, model,
# penalty or kind registered by a plugin or by Python code shows in `--help` (the registries import no torch).
_LIVE_HELP: list[tuple[Any, Callable[[], str]]] = []


def _live(help_fn: Callable[[], str], **kw: Any) -> Any:
    """A ``typer.Option`` whose help is ``help_fn()``, recomputed by :func:`_refresh_help`."""
    info = typer.Option(help=help_fn(), **kw)
    _LIVE_HELP.append((info, help_fn))
    return info


def _refresh_help() -> None:
    for info, help_fn in _LIVE_HELP:
        info.help = help_fn()  # Typer copies the option's info when it builds the command, at each call


def _esc(text: str) -> str:
    return text.replace("[", "\\[")  # a bracket would be eaten as Rich markup


def _or(names: list[str]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


def _kinds_help() -> str:
    return _esc(_or([f"{k} ({e.summary})" if e.summary else k for k, e in TRIAL_KINDS.items()]))


def _triggers_help() -> str:
    return _esc(", ".join(TRIGGERS))


def _penalties_help() -> str:
    docs = {k: (fn.__doc__ or "").strip().splitlines() for k, fn in PENALTIES.items()}
    return _esc("; ".join(f"{k} = {d[0]}" if d else k for k, d in docs.items()))


KindOpt = Annotated[Kind, _live(lambda: f"Trial kind: {_kinds_help()}.")]


@app.callback()
def _root() -> None:
    """Sweep data-poisoning trials, track them in MLflow and draw the safety-efficacy frontier."""


def _opt(help: str, **kw: Any) -> Any:
    return typer.Option(help=help, show_default=True, **kw)


_NOT_FIELDS = ("config", "json_path", "checkpoint", "overwrite", "quiet", "kind", "set_")


@app.command()
def trial(
    ctx: typer.Context,
    dataset: Annotated[
        DatasetName, _opt("Dataset; digits ships with scikit-learn, the others are read from --data-dir.")
    ] = _D["dataset"],
    data_dir: Annotated[str, _opt("Folder with the MNIST IDX / CIFAR pickle files.")] = _D["data_dir"],
    download: Annotated[bool, _opt("Download missing dataset files (needs internet).")] = _D["download"],
    verify_checksums: Annotated[bool, _opt("Check every dataset file against its published md5.")] = _D[
        "verify_checksums"
    ],
    model: Annotated[str, _live(lambda: f"A registered model: {_esc(model_syntax())}.", show_default=True)] = _D[
        "model"
    ],
    trigger: Annotated[
        str, _live(lambda: f"A registered backdoor trigger: {_triggers_help()}.", show_default=True)
    ] = _D["trigger"],
    trigger_size: Annotated[
        int | None, _opt("Trigger arm/side in px \\[default: 2 for lshape; square 4, or 2 on 8x8].", min=1)
    ] = None,
    trigger_margin: Annotated[
        int | None,
        _opt("Trigger distance from the border in px \\[default: 3 for lshape, 1 for square; 0 on 8x8].", min=0),
    ] = None,
    warp_strength: Annotated[
        float, _opt("WaNet strength phi: displacement in [-1,1] image coordinates, in (0, 1].")
    ] = _D["warp_strength"],
    warp_grid: Annotated[int, _opt("WaNet control grid side k, in [2, 64].")] = _D["warp_grid"],
    warp_seed: Annotated[int, _opt("Seed of the WaNet warp field.", min=0)] = _D["warp_seed"],
    trigger_amplitude: Annotated[
        float, _opt("Patch triggers: pixels become (1-a)*x + a, a in (0, 1]; 1 sets them to 1.0.")
    ] = _D["trigger_amplitude"],
    blend_alpha: Annotated[float, _opt("Blend trigger strength alpha in (0, 1]: (1-alpha)*x + alpha*pattern.")] = _D[
        "blend_alpha"
    ],
    blend_seed: Annotated[int, _opt("Seed of the blend trigger's random pattern.", min=0)] = _D["blend_seed"],
    poison_mode: Annotated[
        PoisonMode, _opt("stochastic: redrawn every epoch (Listing 4); deterministic: fixed per index (Listing 3).")
    ] = _D["poison_mode"],
    theta: Annotated[float, _opt("Poison fraction of the non-target training samples, in [0, 1).")] = _D["theta"],
    target: Annotated[int, _opt("Target class of the backdoor, in [0, classes-1].")] = _D["target"],
    kappa: Annotated[float, _opt("Input-gradient penalty strength, >= 0 (scale set by --penalty).")] = _D["kappa"],
    penalty: Annotated[str, _live(lambda: f"A registered penalty: {_penalties_help()}.", show_default=True)] = _D[
        "penalty"
    ],
    augment: Annotated[bool, _opt("Random crop + horizontal flip, batched on the device.")] = _D["augment"],
    crop_padding: Annotated[
        int | None, _opt("Zero padding of the random crop in px \\[default: 4, or 1 on 8x8].", min=0)
    ] = None,
    epochs: Annotated[int, _opt("Training epochs, >= 1.")] = _D["epochs"],
    lr: Annotated[float | None, _opt("SGD learning rate \\[default: 0.1 for preresnet, 0.01 otherwise].")] = None,
    momentum: Annotated[float, _opt("SGD momentum, in [0, 1).")] = _D["momentum"],
    weight_decay: Annotated[float, _opt("L2 weight decay, in [0, 1].")] = _D["weight_decay"],
    lr_decay: Annotated[float, _opt("Multiplicative LR drop, in (0, 1].")] = _D["lr_decay"],
    lr_drops: Annotated[int, _opt("Number of equally spaced LR drops (2: every epochs/3).")] = _D["lr_drops"],
    batch_size: Annotated[int | None, _opt("Training batch size \\[default: 32 on digits, else 128].", min=1)] = None,
    eval_batch_size: Annotated[int, _opt("Batch size for evaluation and Hessian products.", min=1)] = _D[
        "eval_batch_size"
    ],
    seed: Annotated[int, _opt("Seed of init, shuffling, augmentation and poisoning.", min=0)] = _D["seed"],
    device: Annotated[str, _opt("auto | cpu | cuda | cuda:N.")] = _D["device"],
    threads: Annotated[
        int,
        _opt(
            "Torch CPU threads (results are bit-reproducible only for the same count; sweeps use --cpus-per-trial).",
            min=1,
        ),
    ] = _D["threads"],
    hessian: Annotated[bool, _opt("Input-Hessian spectrum and trigger overlap after training.")] = _D["hessian"],
    hessian_split: Annotated[
        HessianSplit, _opt("Data averaged into H (auto: clean-train if stochastic, poisoned-train if deterministic).")
    ] = _D["hessian_split"],
    hessian_samples: Annotated[int, _opt("At most this many samples averaged into H.", min=1)] = _D["hessian_samples"],
    hessian_iterations: Annotated[int, _opt("Lanczos iterations (paper: 10).", min=1)] = _D["hessian_iterations"],
    hessian_top_k: Annotated[int, _opt("Eigenpairs kept, <= iterations.", min=1)] = _D["hessian_top_k"],
    hessian_method: Annotated[
        HessianMethod,
        _opt(
            "Spectrum path: exact (Jacobians + eigh, piecewise-linear nets), gram-lanczos, or HVP Lanczos (double-backward, gauss-newton); auto picks exact when it fits --hessian-dense-mb."
        ),
    ] = _D["hessian_method"],
    hessian_dtype: Annotated[DType, _opt("Precision of the spectrum computation.")] = _D["hessian_dtype"],
    hessian_dense_mb: Annotated[
        int, _opt("Memory budget in MiB for the exact path (24*D^2 bytes) or gram-lanczos's A (N*K*D values).", min=1)
    ] = _D["hessian_dense_mb"],
    hessian_tol: Annotated[
        float, _opt("Lanczos restarts until every top-k residual ||Hv - lambda v||/|lambda_1| is <= this, in (0, 1].")
    ] = _D["hessian_tol"],
    hessian_max_iterations: Annotated[
        int, _opt("Cap on Lanczos iterations over restarts, >= --hessian-iterations.", min=1)
    ] = _D["hessian_max_iterations"],
    spectrum_every: Annotated[int, _opt("Also measure the spectrum every N epochs (0: only at the end).", min=0)] = _D[
        "spectrum_every"
    ],
    geometry: Annotated[bool, _opt("Penultimate-feature geometry table (Appendix B).")] = _D["geometry"],
    detect: Annotated[
        bool | None,
        typer.Option(
            help="Trigger-agnostic detection statistics from the spectrum: shape, localisation, flip concentration, per-class curvature (cheap; needs --hessian) \\[default: on with --hessian].",
            show_default=False,
        ),
    ] = _D["detect"],
    detect_baselines: Annotated[
        str,
        _opt(
            "Baseline detectors, comma-separated subset of nc,ss,ac (Neural Cleanse, Spectral Signatures, Activation Clustering)."
        ),
    ] = _D["detect_baselines"],
    detect_windows: Annotated[
        str, _opt("Localisation window sides in px, comma-separated, each <= the image side.")
    ] = _D["detect_windows"],
    detect_norms: Annotated[
        str, _opt("Eigenvector perturbation norms relative to the images' mean norm, comma-separated, > 0.")
    ] = _D["detect_norms"],
    detect_samples: Annotated[int, _opt("Held-out clean test images for flip concentration and Neural Cleanse.")] = _D[
        "detect_samples"
    ],
    detect_trace_samples: Annotated[int, _opt("Spectrum samples (seeded subset) in the trace estimate of H.")] = _D[
        "detect_trace_samples"
    ],
    detect_probes: Annotated[int, _opt("Trace-estimate passes (one random probe per sample each).")] = _D[
        "detect_probes"
    ],
    nc_steps: Annotated[int, _opt("Neural Cleanse optimisation steps.")] = _D["nc_steps"],
    nc_batch_size: Annotated[int, _opt("Neural Cleanse clean images per class per step.")] = _D["nc_batch_size"],
    config: Annotated[Path | None, _opt("YAML/JSON file of trial fields; explicit flags override it.")] = None,
    kind: KindOpt = Kind.network,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Any trial field FIELD=VALUE (the only way to reach kernel/linear fields such as m, r, ell); a list field takes its list as one value (--set detect_baselines=nc,ss); repeatable.",
            show_default=False,
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write {config, metrics, status, history} here.")
    ] = None,
    checkpoint: Annotated[Path | None, _opt("Checkpoint file: written every epoch, resumed from if it exists.")] = None,
    overwrite: Annotated[bool, _opt("Allow --json to replace an existing file.")] = False,
    quiet: Annotated[bool, _opt("No progress bar.")] = False,
) -> dict[str, Any]:
    """Run one trial locally: poison, train with the penalty, evaluate, analyse (or a kernel / linear trial)."""
    from .spaces import trial_config

    flags = {
        k: v.value if isinstance(v, Enum) else v
        for k, v in ctx.params.items()
        if k not in _NOT_FIELDS and ctx.get_parameter_source(k) not in (_click_core.ParameterSource.DEFAULT, None)
    }
    cfg = trial_config(kind.value, config, flags, set_)
    if json_path is not None:
        _check_writable(json_path, overwrite)
    from trainables.train import write_json

    from .progress import run_with_progress

    try:
        result = run_with_progress(cfg, checkpoint=checkpoint, quiet=quiet)
    except KeyboardInterrupt:
        hint = (
            f"; the checkpoint {checkpoint} holds the last finished epoch: the same command resumes from it"
            if checkpoint is not None and Path(checkpoint).is_file()
            else "; nothing was saved (pass --checkpoint FILE to make a trial resumable)"
        )
        raise Interrupted(f"trial interrupted{hint}") from None
    if json_path is not None:
        write_json(result, json_path)
    _print_summary(result)
    return result.to_json_dict()


class SweepFailed(Exception):
    """A sweep that ended with failed trials: exit 1 after its summary."""


class Interrupted(Exception):
    """Ctrl-C: one line saying what was kept, exit code 130."""


# ----------------------------------------------------------------------------- sweeps
GRID_FLAGS = ("theta", "kappa", "augment", "epochs", "dataset", "model", "trigger", "poison_mode")
Axis = Annotated[str | None, typer.Option(show_default=False)]


def _axis_opt(help: str) -> Any:
    return typer.Option(help=help + " Values: a,b,c | START:STOP:STEP | log:START:STOP:N.", show_default=False)


ThetaAxis = Annotated[str | None, _axis_opt("Poison fractions theta in [0, 1).")]
KappaAxis = Annotated[str | None, _axis_opt("Penalty strengths kappa >= 0.")]
AugmentAxis = Annotated[str | None, typer.Option(help="Augmentation: on, off or both.", show_default=False)]
EpochsAxis = Annotated[str | None, _axis_opt("Epoch counts >= 1.")]
SeedsOpt = Annotated[str | None, typer.Option(help="N (seeds 0..N-1) or a list a,b,c.", show_default=False)]
DatasetAxis = Annotated[
    str | None, typer.Option(help=f"Datasets, comma-separated: {', '.join(DATASETS)}.", show_default=False)
]
ModelAxis = Annotated[str | None, _live(lambda: f"Models: {_esc(model_syntax())}.", show_default=False)]
TriggerAxis = Annotated[str | None, _live(lambda: f"Triggers: {_triggers_help()}.", show_default=False)]
PoisonModeAxis = Annotated[
    str | None, typer.Option(help=f"Poison modes: {', '.join(POISON_MODES)}.", show_default=False)
]
SweepFileOpt = Annotated[
    Path | None, typer.Option(help="YAML sweep file (name, grid, fixed, seeds); flags override it.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Any other trial field, FIELD=VALUE(S); repeatable. a,b is an axis (--set lr=0.01,0.1), except for a list field (detect_baselines, detect_windows, detect_norms), where a,b is one list and | separates an axis over lists: --set 'detect_baselines=nc,ss|ac' is 2 trials.",
        show_default=False,
    ),
]
NameOpt = Annotated[
    str | None,
    typer.Option(
        help="Sweep name: folder, MLflow experiment \\[default: the sweep file's name, else digits-demo].",
        show_default=False,
    ),
]
StorageOpt = Annotated[
    str, typer.Option(help="Folder (or URI) holding sweeps, checkpoints and the embedded MLflow store.")
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        help="Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT \\[default: start a local Ray].",
        show_default=False,
    ),
]
MlflowOpt = Annotated[
    str | None, typer.Option(help="Tracking server URI \\[default: sqlite:///<storage>/mlflow.db].", show_default=False)
]
CpusOpt = Annotated[float, typer.Option(help="CPUs per trial (> 0); also its torch threads.")]
GpusOpt = Annotated[
    float | None,
    typer.Option(
        help="GPUs per trial, fractions allowed \\[default: 1 if the cluster has GPUs, else 0].", show_default=False
    ),
]
MaxConcurrentOpt = Annotated[
    int | None,
    typer.Option(help="At most this many trials at once \\[default: as resources allow].", show_default=False),
]
MaxFailuresOpt = Annotated[
    int, typer.Option(help="Retries of a trial that raised (>= 0); it resumes from its checkpoint.")
]
QuietOpt = Annotated[bool, typer.Option(help="No per-epoch progress lines.")]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Also print the libraries' log records (Ray, MLflow, "
        "Optuna) and Ray workers' output; they always go to <sweep>/sweeper.log.",
    ),
]


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
    kind: KindOpt = Kind.network,
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
) -> dict[str, Any]:
    """Run a grid sweep on Ray Tune, tracked in MLflow; prints the trials and the frontier.

    With no flags: theta in {0.05, 0.1} x kappa in {0, 200, 400, 800} on digits, 15 epochs.
    """
    from . import logs
    from .orchestrate import SweepOptions, run_sweep
    from .spaces import build_spec

    logs.capture(verbose)
    flags = {k: v for k, v in locals().items() if k in GRID_FLAGS}
    spec, file_name = build_spec(sweep_file, flags, seeds, set_, kind.value)  # file < flags < --set
    default_name = "digits-demo" if spec.kind == "network" else f"{spec.kind}-demo"
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
    if not quiet:  # the size before Ray starts (a surprise axis shows now, not hours later); never `sweep NAME:`,
        # the final summary's line that scripts parse
        typer.echo(f"launching sweep {opts.name}: {spec.describe()} on {_where(address)}")
    report = run_sweep(spec, opts)
    _report(report)
    return {"counts": report.counts, "rows": report.rows, "path": report.path}


def _where(address: str | None) -> str:
    return "local Ray" if address is None else f"Ray at {address}"


def _search_size(spec, budget: int, seeds: str | None) -> str:
    """``budget 12 defences x 2 models each (theta x seed = 2 x 1) = up to 24 models`` (a bad space raises here)."""
    import math

    from .defence import split_threats
    from .spaces import parse_seeds

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
    from analysis.report import sweep_summary

    from .ui import browse_lines

    typer.echo(f"\nsweep {report.name}: " + ", ".join(f"{v} {k}" for k, v in report.counts.items()))
    typer.echo(sweep_summary(report.rows, report.varying, report.groups, report.objectives))
    c = report.counts
    storage = report.path.rsplit("/", 1)[0]
    typer.echo(f"\nresults: {report.path}\nMLflow: {report.mlflow_uri} (experiment {report.name})")
    from . import logs

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
) -> dict[str, Any]:
    """Search the defender's choices (kappa, augmentation, epochs, --set lr=...) against a fixed threat
    set (--theta, --trigger, --poison-mode as values or lists): each defence is trained against every
    threat, scored by mean clean accuracy and worst-case ASR, and the frontier is drawn over defences."""
    from . import logs
    from .orchestrate import SweepOptions, run_search
    from .spaces import build_search_spec

    logs.capture(verbose)
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
    if not quiet:
        typer.echo(f"launching search {name}: {_search_size(spec, budget, seeds)} on {_where(address)}")
    report = run_search(
        spec,
        opts,
        budget=budget,
        sampler=sampler.value,
        seed=seed,
        seeds=seeds,
        objectives=objectives,
        aggregate=aggregate.value if aggregate else None,
    )
    _report(report)
    return {"counts": report.counts, "rows": report.rows, "path": report.path}


@app.command("frontier")
def frontier_cmd(
    name: Annotated[str, typer.Argument(help="Sweep name (a folder under --storage / an MLflow experiment).")],
    objectives: Annotated[
        str | None,
        typer.Option(
            help="METRIC:max|min, comma-separated (2 or more) \\[default: the trial kind's, clean_acc:max,asr:min for networks].",
            show_default=False,
        ),
    ] = None,
    group_by: Annotated[
        str | None,
        typer.Option(
            help="Columns to compute one frontier per group, e.g. theta or augment,epochs; none for one global frontier \\[default: the attack fields that vary].",
            show_default=False,
        ),
    ] = None,
    aggregate_seeds: Annotated[
        bool | None,
        typer.Option(
            "--aggregate-seeds/--per-seed",
            help="Average the seeds of each configuration (mean, std, n_seeds) before the frontier, or keep one point per seed \\[default: average when a configuration ran with several seeds].",
            show_default=False,
        ),
    ] = None,
    csv: Annotated[
        Path | None,
        typer.Option(help="Also write the frontier as CSV here (refuses to overwrite).", show_default=False),
    ] = None,
    storage: StorageOpt = "./sweeps",
    mlflow_uri: MlflowOpt = None,
    source: Annotated[str, typer.Option(help="auto (MLflow, else the Ray folder), mlflow or ray.")] = "auto",
    threats: Annotated[
        Aggregate | None,
        typer.Option(
            help="Defence searches: combine each objective over the threats by worst case or mean \\[default: the search's].",
            show_default=False,
        ),
    ] = None,
) -> dict[str, Any]:
    """Print a sweep's safety-efficacy frontier as a table (a defence search's: over its defences,
    with the frontier defences' per-threat values)."""
    from analysis.report import sweep_frontier

    if csv is not None and csv.exists():
        raise SweeperError(f"--csv {csv} already exists; refusing to overwrite it")
    res = sweep_frontier(
        name, storage, mlflow_uri, source, objectives, group_by, aggregate_seeds, threats.value if threats else None
    )
    front, objs, groups = res["frontier"], res["objectives"], res["groups"]
    metrics = [m for m, _ in objs]
    defence = "detail" in res
    shown = [
        c for c in [*(["defence_key"] if defence else []), *res["varying"], "n_seeds", *groups] if c in front.columns
    ]
    shown = list(
        dict.fromkeys(
            shown
            + [c for m in metrics for c in (m, f"{m}_std") if c in front.columns]
            + [c for c in ("n_models", "n_diverged") if defence and c in front.columns]
        )
    )
    if res["source"] and not res["source"].startswith("mlflow"):
        typer.echo(f"(read from {res['source']})", err=True)
    what = (
        ", ".join(f"{o.metric} {o.direction} ({o.aggregate} over threats)" for o in res["aggregation"])
        if defence
        else ", ".join(f"{m} {d}" for m, d in objs)
    )
    unit = "completed defences" if defence else "completed trials"
    points = (
        f"{len(front)} configurations (each the mean of its seeds) from {res['n_completed']} {unit}"
        if "n_seeds" in front.columns and not defence
        else f"{len(front)} of {res['n_completed']} {unit}"
    )
    typer.echo(f"frontier of {name} ({what}" + (f"; per {', '.join(groups)}" if groups else "") + f"): {points}")
    typer.echo(front[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}") if not front.empty else "(empty)")
    if defence and not res["detail"].empty:
        typer.echo("\nper threat (mean over seeds) of the frontier's defences:")
        typer.echo(res["detail"].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    skipped = res["unfinished"]
    if not skipped.empty:
        typer.echo(
            f"not completed ({len(skipped)}): "
            + ", ".join(f"{_point(r, res['varying'])} {r['status']}" for _, r in skipped.iterrows())
        )
    if csv is not None:
        front.to_csv(csv, index=False)
    return {"frontier": front, "detail": res.get("detail")}


def _point(row, varying: list[str]) -> str:
    """A trial (or defence) named by its varying values, as the progress lines and summaries name it; its key
    only when nothing varies."""
    import pandas as pd

    def short(v):
        return f"{v:.4g}" if isinstance(v, float) else v

    shown = [
        f"{k}={short(row[k])}" for k in varying if k in row and not (isinstance(row[k], float) and pd.isna(row[k]))
    ]
    return " ".join(shown) or str(row.get("defence_key") or row.get("trial_key"))


@app.command()
def detect(
    name: Annotated[str, typer.Argument(help="Sweep name: clean (theta 0) and poisoned models, several seeds each.")],
    statistics: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated statistics \\[default: every detection score in the results, then the oracles].",
            show_default=False,
        ),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option(help="Bootstrap resamples of the AUROC's 95% interval.", min=100, max=100_000)
    ] = 1000,
    csv: Annotated[
        Path | None, typer.Option(help="Also write the table as CSV here (refuses to overwrite).", show_default=False)
    ] = None,
    storage: StorageOpt = "./sweeps",
    mlflow_uri: MlflowOpt = None,
    source: Annotated[str, typer.Option(help="auto (MLflow, else the Ray folder), mlflow or ray.")] = "auto",
) -> dict[str, Any]:
    """Score every detection statistic over the sweep's populations of models: AUROC [95% CI] and TPR at
    5% FPR per statistic x theta x defence settings, and the detectability lag."""
    from analysis.detect import detect_sweep

    if csv is not None and csv.exists():
        raise SweeperError(f"--csv {csv} already exists; refusing to overwrite it")
    res = detect_sweep(
        name, storage, mlflow_uri, source, statistics, bootstrap, progress=lambda line: typer.echo(line, err=True)
    )
    if res["source"] and not res["source"].startswith("mlflow"):
        typer.echo(f"(read from {res['source']})", err=True)
    typer.echo(res["text"])
    if csv is not None:
        res["table"].to_csv(csv, index=False)
    return {"table": res["table"], "lag": res["lag"]}


@app.command()
def report(
    name: Annotated[str, typer.Argument(help="Sweep name.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for figures and summary \\[default: <storage>/<name>-report].", show_default=False),
    ] = None,
    storage: StorageOpt = "./sweeps",
    mlflow_uri: MlflowOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Write into a non-empty --out folder.")] = False,
    log_to_mlflow: Annotated[bool, typer.Option(help="Log the report to the sweep's parent MLflow run.")] = True,
    source: Annotated[str, typer.Option(help="auto (MLflow, else the Ray folder), mlflow or ray.")] = "auto",
) -> dict[str, Any]:
    """Write every figure (PNG + SVG) and a one-page Markdown + HTML summary; log them to MLflow."""
    from analysis.report import write_report
    from analysis.schema import local_folder

    folder = out if out is not None else (local_folder(storage, f"{name}-report") or Path(f"{name}-report").absolute())
    res = write_report(
        name,
        folder,
        storage,
        mlflow_uri,
        overwrite=overwrite,
        log_to_mlflow=log_to_mlflow,
        source=source,
        progress=lambda line: typer.echo(line, err=True),
    )
    for note in res["notes"]:  # where it read from when MLflow did not answer, and what it left out
        typer.echo(f"({note})", err=True)
    typer.echo(
        f"report of {name}: {len([f for f in res['figures'] if f.suffix == '.png'])} figures, "
        f"{res['out'] / 'summary.md'}, {res['out'] / 'summary.html'}"
        + (f"; logged to MLflow run {res['mlflow_parent_run']}" if res["mlflow_parent_run"] else "")
    )
    if not res["problems"].empty:
        typer.echo(f"not completed: {len(res['problems'])} trial(s), listed in the summary")
    return {"out": str(res["out"])}


@app.command()
def theory(
    out: Annotated[Path, typer.Option(help="Folder for theory.png/.svg, by_m.csv, by_r.csv and summary.json.")] = Path(
        "theory"
    ),
    m: Annotated[
        str, typer.Option(help="Poison counts (include 0 for the small-m slope).")
    ] = "0,1,2,4,8,16,32,64,128,256,512,1024,4096",
    r: Annotated[str, typer.Option(help="Trigger distances r = ||x0 - zeta||.")] = "log:0.001:2:16",
    m_for_r: Annotated[int, typer.Option("--m-for-r", help="Poison count of the r sweep.", min=1)] = 64,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Other kernel-trial fields, FIELD=VALUE (ell, lam, n_clean, dim, jitter...).",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Write into a non-empty --out folder.")] = False,
) -> dict[str, Any]:
    """KRR laws numerically vs closed form over m and r: linear-then-saturating efficacy, curvature
    quadratic in efficacy, and the near-clone twilight zone where the spike vanishes but efficacy stays."""
    from analysis.theory import run_theory
    from trainables.kernel import KernelConfig

    from .spaces import parse_sets, parse_values

    base = KernelConfig.from_dict({"kind": "kernel", "lam": 0.1, **parse_sets(set_, "kernel")})
    ms = [int(v) for v in parse_values("m", m, kind="kernel")]
    res = run_theory(base, ms, parse_values("r", r, kind="kernel"), m_for_r, out, overwrite)
    summary = res["summary"]
    for k, v in summary.items():
        typer.echo(f"{k:28} {v:.6g}" if isinstance(v, float) else f"{k:28} {v}")
    typer.echo(f"figures: {', '.join(str(f) for f in res['figures'])}")
    return summary


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
    kind: KindOpt = Kind.network,
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

    from .costs import plan_costs, store_uri
    from .spaces import build_spec

    flags = {k: v for k, v in locals().items() if k in GRID_FLAGS}
    spec, _ = build_spec(sweep_file, flags, seeds, set_, kind.value)
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
) -> dict[str, Any]:
    """Continue an interrupted sweep: nothing finished is re-run, unfinished trials continue from their last epoch."""
    from . import logs
    from .orchestrate import resume_sweep

    logs.capture(verbose)

    report = resume_sweep(name, storage, errored=errored, address=address)
    _report(report)
    return {"counts": report.counts, "rows": report.rows}


@app.command()
def status(
    name: Annotated[str, typer.Argument(help="Sweep name (a folder under --storage).")],
    storage: StorageOpt = "./sweeps",
) -> dict[str, Any]:
    """Trials completed / diverged / failed / running / interrupted / pending of a sweep."""
    from .states import sweep_status

    st = sweep_status(name, storage)
    typer.echo(
        f"sweep {st['name']} ({st['path']}): "
        + ", ".join(
            f"{st[k]} {k}" for k in ("completed", "diverged", "failed", "running", "interrupted", "pending", "total")
        )
    )
    return st


@app.command()
def ui(
    name: Annotated[
        str | None,
        typer.Argument(
            help="Sweep whose runs table to link \\[default: none, the experiment list].", show_default=False
        ),
    ] = None,
    storage: StorageOpt = "./sweeps",
    mlflow_uri: MlflowOpt = None,
    port: Annotated[int, typer.Option(help="Port of the MLflow UI on 127.0.0.1.", min=1, max=65535)] = 5000,
) -> dict[str, Any]:
    """Browse a sweep in the MLflow UI: starts it on the sweep store and prints the runs table's link (Ctrl-C stops it)."""
    from .ui import UIStopped, serve_ui

    try:
        return serve_ui(name, storage, mlflow_uri, port, echo=typer.echo)
    except UIStopped as e:  # the server's whole process tree is gone by now
        if e.exit_code == 130:  # Ctrl-C: exit 130 like every command
            raise Interrupted(str(e)) from None
        typer.echo(f"sweeper: {e}", err=True)
        raise typer.Exit(e.exit_code) from None  # 128 + the signal's number: 143 for SIGTERM, 129 for SIGHUP


def _check_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise SweeperError(f"--json {path} already exists; refusing to overwrite it (pass --overwrite)")
    if path.exists() and path.is_dir():
        raise SweeperError(f"--json {path} is a directory, expected a file path")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise SweeperError(f"--json {path}: folder {parent} does not exist")


def _print_summary(result) -> None:
    m = result.metrics
    if getattr(result, "config", {}).get("kind", "network") != "network":
        typer.echo("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))
        return
    keys = [
        k
        for k in (
            "clean_acc",
            "asr",
            "train_acc",
            "n_poisoned",
            "penalty",
            "fisher_trace",
            "lambda_1",
            "eig_gap",
            "overlap_sq",
            "max_overlap_sq",
            "max_overlap_index",
            "det_lambda_ratio",
            "det_ipr_max",
            "det_flip_max",
            "det_flip_class",
            "nc_anomaly_index",
            "nc_class",
            "ss_auroc",
            "ac_auroc",
            "train_seconds",
        )
        if k in m
    ]
    line = "  ".join(f"{k}={m[k]:.4g}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys)
    status = result.status + (f" at epoch {result.diverged_epoch}" if result.diverged_epoch else "")
    typer.echo(f"status={status}  {line}")
    h = result.artifacts.get("hessian")
    if h:  # which spectrum path ran, and why (auto chooses by model and memory budget)
        tail = (
            ""
            if h.get("method_used") == "exact"
            else (f", {h.get('lanczos_iterations')} Lanczos iterations, converged={h.get('converged')}")
        )
        typer.echo(f"spectrum: {h.get('method_used')} ({h.get('reason')}{tail})")


def _given_value(argv: list[str], param) -> str:
    """`` (got 'abc')`` for the option a parse error is about, so the message names the value."""
    for opt in getattr(param, "opts", None) or ():
        for i, tok in enumerate(argv):
            if tok == opt and i + 1 < len(argv):
                return f" (got {argv[i + 1]!r})"
            if tok.startswith(opt + "="):
                return f" (got {tok.split('=', 1)[1]!r})"
    return ""


_REASONS = (  # the parser's (pydantic-style) reasons, in the project's words
    (re.compile(r"Input should be a valid number.*"), "expected a number"),
    (re.compile(r"Input should be a valid integer.*"), "expected a whole number"),
    (re.compile(r"Input should be a valid boolean.*"), "expected true or false"),
    (re.compile(r"Value error, '.*' is not one of (.*)\.$"), r"must be one of \1"),
)


def _bad_value(msg: str, given: str) -> str:
    """``Invalid value for '--theta': Input should be a valid number...`` as ``--theta='abc' is invalid: expected
    a number``; empty when the message is not about one option's value."""
    m = re.match(r"Invalid value for '(--[\w-]+)'(?: / '--[\w-]+')?: (.*)", msg)
    if not m or not given:
        return ""
    reason = m.group(2)
    for pattern, words in _REASONS:
        reason = pattern.sub(words, reason)
    reason = re.sub(r"\s*\(got .*\)$", "", reason)
    return f"{m.group(1)}={given.removeprefix(' (got ').removesuffix(')')} is invalid: {reason}"


def _set_hint(e, argv: list[str]) -> str:
    """For ``--lr 0.01`` on a command without that flag: say that ``--set lr=0.01`` reaches the field."""
    opt = getattr(e, "option_name", None)
    if not isinstance(e, _click_exc.NoSuchOption) or not opt or not opt.startswith("--"):
        return ""
    from trainables import TRIAL_KINDS

    field = opt[2:].split("=", 1)[0].replace("-", "_")
    if not any(field in {f.name for f in dataclasses.fields(k.config())} for k in TRIAL_KINDS.values()):
        return ""
    value = next((argv[i + 1] for i, t in enumerate(argv[:-1]) if t == opt), None)
    value = opt.split("=", 1)[1] if "=" in opt else value
    return f"; {field} is a trial field: use --set {field}={value if value is not None else 'VALUE'}"


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one-line errors and exit code 2 for any bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from . import logs

    logs.capture()  # library records to a log file; the terminal keeps the project's lines
    try:
        load_plugins()  # a plugin that fails to import is a SweeperError: one line, exit 2
        _refresh_help()
        rc = app(args=argv, standalone_mode=False)
    except _click_exc.NoArgsIsHelpError:
        return 2  # help was printed
    except _click_exc.UsageError as e:
        where = f" (sweeper {e.ctx.info_name})" if e.ctx is not None and e.ctx.info_name != "sweeper" else ""
        given = _given_value(argv, getattr(e, "param", None))
        msg = _one_line(e.format_message()).replace(" (Possible options: --help)", "")  # click's non-suggestion
        uniform = _bad_value(msg, given)
        if uniform:  # the wording of every other bad value: --flag='x' is invalid: expected ...
            typer.echo(f"sweeper: error{where}: {uniform}", err=True)
            return 2
        typer.echo(f"sweeper: error{where}: {msg}{given}{_set_hint(e, argv)}", err=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("sweeper: interrupted", err=True)
        return 130
    except Interrupted as e:
        typer.echo(f"sweeper: {e}", err=True)
        return 130
    except SweepFailed as e:
        typer.echo(f"sweeper: {e}", err=True)
        return 1
    except (typer.Exit, _click_exc.ClickException) as e:
        return getattr(e, "exit_code", 1)
    except SweeperError as e:
        typer.echo(f"sweeper: error: {_one_line(str(e))}", err=True)
        return 2
    if rc == 130:  # Typer turns Ctrl-C inside a command into a returned 130, not an exception
        typer.echo("sweeper: interrupted", err=True)
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
