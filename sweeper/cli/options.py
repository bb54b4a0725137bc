"""The ``sweeper`` Typer app and the options its commands share.

The app, the live help of registry-backed options (a plugin's trigger shows in ``--help``), the
sweep options (axes, storage, cluster), the two exits that are not errors (:class:`SweepFailed`,
:class:`Interrupted`), and the ``trial`` options generated from the config fields' declarations.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

try:  # typer >= 0.20 vendors its own click; its exceptions are the ones raised
    from typer._click import core as _click_core  # noqa: F401 - used by the commands' modules
    from typer._click import exceptions as _click_exc  # noqa: F401
except ImportError:  # pragma: no cover - older typer on real click
    from click import core as _click_core  # noqa: F401
    from click import exceptions as _click_exc  # noqa: F401

from trainables import TRIAL_KINDS, load_plugins
from trainables.attack.triggers import TRIGGERS
from trainables.config import SweeperError, TrialConfig
from trainables.fields import Options, specs, value_type
from trainables.networks.models import model_syntax

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


KindOpt = Annotated[Kind, _live(lambda: f"Trial kind: {_kinds_help()}.")]
SweepKindOpt = Annotated[
    Kind | None,
    _live(lambda: f"Trial kind: {_kinds_help()} \\[default: the sweep file's, else network].", show_default=False),
]


@app.callback()
def _root() -> None:
    """Sweep data-poisoning trials, track them in MLflow and draw the safety-efficacy frontier."""


def _opt(help: str, **kw: Any) -> Any:
    return typer.Option(help=help, show_default=True, **kw)


_PANELS = {  # a field's group -> its panel in `sweeper trial --help`
    "data": "Data",
    "model": "Model",
    "attack": "Attack",
    "defence": "Defence",
    "optimisation": "Optimisation",
    "spectrum": "Input-Hessian spectrum",
    "detection": "Detection",
}


def field_parameters(cls: type = TrialConfig) -> list[inspect.Parameter]:
    """One keyword-only option per declared field of ``cls`` (plugin fields included), generated from the
    field's declaration: type, default, help with its range, and its group as the help panel."""
    out = []
    for name, d in specs(cls).items():
        default, spec = d.default, d.spec
        kind: Any = value_type(spec)
        if isinstance(spec.check, Options) and not callable(spec.check.names):  # a fixed list: an Enum, so the
            # parser names the choices; a registry's names are read at validation (a plugin may add one)
            kind = Enum(f"{name}_choice", {v.replace("-", "_"): v for v in spec.check.choices()}, type=str)
        info = typer.Option(  # made anew by each main(): the help of a registry's names is current
            help=_esc(spec.describe()),
            show_default=default is not None,
            rich_help_panel=_PANELS.get(spec.group, "Plugin fields"),
        )
        ann = Annotated[kind | None if default is None else kind, info]
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=default))
    return out


def field_range(name: str) -> str:
    """A network-trial field's range as its declaration states it (``in [0, 1)``)."""
    return specs(TrialConfig, extras=False)[name].spec.check.describe()  # at import: no plugin loading here


class SweepFailed(Exception):
    """A sweep that ended with failed trials: exit 1 after its summary."""


class Interrupted(Exception):
    """Ctrl-C: one line saying what was kept, exit code 130."""


# ----------------------------------------------------------------------------- sweeps
GRID_FLAGS = ("theta", "kappa", "augment", "epochs", "dataset", "model", "trigger", "poison_mode")
Axis = Annotated[str | None, typer.Option(show_default=False)]


def _axis_opt(help: str) -> Any:
    return typer.Option(help=help + " Values: a,b,c | START:STOP:STEP | log:START:STOP:N.", show_default=False)


ThetaAxis = Annotated[str | None, _axis_opt(f"Poison fractions theta, each {field_range('theta')}.")]
KappaAxis = Annotated[str | None, _axis_opt(f"Penalty strengths kappa, each {field_range('kappa')}.")]
AugmentAxis = Annotated[str | None, typer.Option(help="Augmentation: on, off or both.", show_default=False)]
EpochsAxis = Annotated[str | None, _axis_opt(f"Epoch counts, each {field_range('epochs')}.")]
SeedsOpt = Annotated[str | None, typer.Option(help="N (seeds 0..N-1) or a list a,b,c.", show_default=False)]
DatasetAxis = Annotated[
    str | None, typer.Option(help=f"Datasets, comma-separated, each {field_range('dataset')}.", show_default=False)
]
ModelAxis = Annotated[str | None, _live(lambda: f"Models: {_esc(model_syntax())}.", show_default=False)]
TriggerAxis = Annotated[str | None, _live(lambda: f"Triggers: {_triggers_help()}.", show_default=False)]
PoisonModeAxis = Annotated[
    str | None,
    typer.Option(help=f"Poison modes, comma-separated, each {field_range('poison_mode')}.", show_default=False),
]
SweepFileOpt = Annotated[
    Path | None, typer.Option(help="YAML sweep file (name, grid, fixed, seeds); flags override it.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Any other trial field, FIELD=VALUE(S); repeatable. a,b is an axis (--set lr=0.01,0.1), except for a "
        f"list field ({', '.join(n for n, d in specs(TrialConfig, extras=False).items() if d.is_list)}), where a,b is "
        "one list and | separates an axis over lists: --set 'detect_baselines=nc,ss|ac' is 2 trials.",
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
_SLURM = "SLURM"  # the help panel of the options below (sweeper.slurm.SlurmOptions holds their values)
SlurmOpt = Annotated[
    bool,
    typer.Option(
        help="Submit the sweep as a SLURM job (sbatch) and return: Ray on the job's nodes, requeued before its "
        "time limit; the script is <storage>/<name>/slurm/job.sbatch.",
        rich_help_panel=_SLURM,
    ),
]
NodesOpt = Annotated[int, typer.Option(help="Nodes of the SLURM job (>= 1).", rich_help_panel=_SLURM)]
TimeOpt = Annotated[
    str | None,
    typer.Option(
        help="The job's time limit (sbatch --time: MINUTES, HH:MM:SS, DAYS-HH:MM) \\[default: the partition's].",
        show_default=False,
        rich_help_panel=_SLURM,
    ),
]
PartitionOpt = Annotated[
    str | None,
    typer.Option(
        help="SLURM partition \\[default: the cluster's default].", show_default=False, rich_help_panel=_SLURM
    ),
]
GpusPerNodeOpt = Annotated[
    int | None, typer.Option(help="GPUs per node of the job.", show_default=False, rich_help_panel=_SLURM)
]
CpusPerNodeOpt = Annotated[
    int | None,
    typer.Option(
        help="CPUs per node of the job \\[default: whole nodes, --exclusive].",
        show_default=False,
        rich_help_panel=_SLURM,
    ),
]
SbatchArgOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--sbatch-arg",
        help="One more sbatch option, written into the job script verbatim (--sbatch-arg=--qos=long); repeatable.",
        show_default=False,
        rich_help_panel=_SLURM,
    ),
]
SLURM_FLAGS = ("slurm", "nodes", "time", "partition", "gpus_per_node", "cpus_per_node", "sbatch_arg")

VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Also print the libraries' log records (Ray, MLflow, "
        "Optuna) and Ray workers' output; they always go to <sweep>/sweeper.log.",
    ),
]


def _check_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise SweeperError(f"--json {path} already exists; refusing to overwrite it (pass --overwrite)")
    if path.exists() and path.is_dir():
        raise SweeperError(f"--json {path} is a directory, expected a file path")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise SweeperError(f"--json {path}: folder {parent} does not exist")
