"""Pure PyTorch trial code: data, triggers, poisoning, models, penalty, Hessian, training,
and the paper's exact models (kernel ridge regression, linear regression).

Nothing here imports Ray or MLflow; the orchestration layer drives :class:`~trainables.training.train.Trial`
or calls :func:`run_any` for the closed-form trial kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainables.config import ConfigError, SweeperError, TrialConfig
from trainables.plugins import load_plugins

if TYPE_CHECKING:
    from trainables.training.train import Trial, TrialResult, run_trial


def __getattr__(name: str):
    # torch and the training code load on first use: `sweeper --help` and `sweeper status` start fast
    if name in ("Trial", "TrialResult", "run_trial"):
        from trainables.training import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class TrialKind:
    """One kind of trial: its config class, how it runs, and how its results are summarised."""

    name: str
    config: Callable[[], type]  # the config dataclass (imported on demand)
    run: Callable[..., Any]  # config -> TrialResult
    columns: tuple[str, ...]  # metrics shown in a sweep's summary, after its varying axes
    objectives: tuple[tuple[str, str], ...]  # the default frontier: (metric, max|min)
    attack_fields: tuple[str, ...]  # the attacker's choices: one frontier per combination that varies
    default_axes: dict[str, list[Any]] = field(default_factory=dict)  # `sweeper run --kind NAME` with no flags
    default_fixed: dict[str, Any] = field(default_factory=dict)
    summary: str = ""  # a few words for `--kind`'s help: "train a net"
    iterative: bool = False  # trains epoch by epoch: checkpoints, a progress bar, torch threads from its CPUs
    seconds: float = 1.0  # a non-iterative trial's rough cost (one dense computation), for `sweeper plan`
    demo: str = ""  # `sweeper run --kind NAME`'s default sweep name [default: NAME-demo]

    @property
    def demo_name(self) -> str:
        """The sweep name ``sweeper run`` uses when none is given."""
        return self.demo or f"{self.name}-demo"


def _run_network(cfg, **kwargs):
    from trainables.training.train import run_trial

    return run_trial(cfg, **kwargs)


def _kernel_config():
    from trainables.exact_models.configs import KernelConfig

    return KernelConfig


def _linear_config():
    from trainables.exact_models.configs import LinearConfig

    return LinearConfig


def _run_kernel(cfg, **_):
    from trainables.exact_models.kernel import run_kernel_trial

    return run_kernel_trial(cfg)


def _run_linear(cfg, **_):
    from trainables.exact_models.linear import run_linear_trial

    return run_linear_trial(cfg)


TRIAL_KINDS: dict[str, TrialKind] = {}


def register_kind(kind: TrialKind) -> TrialKind:
    """Add a trial kind: the CLI's --kind, sweep files, validation and the analysis read this registry.

    Its config class declares every field with :func:`trainables.fields.field`, including a fixed
    ``kind`` field naming the kind (records say which kind they are). A summary column or objective
    may not be named like a column every results row has (``status``, ``error``, ...).
    """
    from .record import ROW_COLUMNS

    clash = sorted({*kind.columns, *(m for m, _ in kind.objectives)} & set(ROW_COLUMNS))
    if clash:
        raise ConfigError(
            f"trial kind {kind.name!r}: metric name(s) {clash} are results columns of every row "
            f"({', '.join(ROW_COLUMNS)}); name the metric otherwise"
        )
    TRIAL_KINDS[kind.name] = kind
    return kind


register_kind(
    TrialKind(
        "network",
        lambda: TrialConfig,
        _run_network,
        columns=("clean_acc", "asr", "max_overlap_sq", "lambda_1"),
        objectives=(("clean_acc", "max"), ("asr", "min")),
        attack_fields=("dataset", "model", "trigger", "poison_mode", "theta"),
        # the paper's trade-off in minutes on digits
        default_axes={"theta": [0.05, 0.1], "kappa": [0.0, 200.0, 400.0, 800.0]},
        default_fixed={"dataset": "digits", "epochs": 15},
        summary="train a net",
        iterative=True,
        demo="digits-demo",
    )
)
register_kind(
    TrialKind(
        "kernel",
        _kernel_config,
        _run_kernel,
        columns=("delta_f", "residual", "spike", "lambda_max", "detectable"),
        # the defender keeps the clean fit (residual) and removes the poisons' efficacy (delta_f)
        objectives=(("residual", "min"), ("delta_f", "min")),
        attack_fields=("m", "r", "jitter", "zeta_dist"),
        default_axes={"m": [1, 2, 4, 8, 16, 32, 64], "r": [0.05, 0.5]},
        summary="KRR laws, Sec. 3",
    )
)
register_kind(
    TrialKind(
        "linear",
        _linear_config,
        _run_linear,
        columns=("clean_acc", "asr", "trigger_cosine", "step_rel_err"),
        objectives=(("clean_acc", "max"), ("asr", "min")),
        attack_fields=("dataset", "theta"),
        default_axes={"theta": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2]},
        summary="QR update, Sec. 4",
    )
)
KINDS = tuple(TRIAL_KINDS)  # the names, for messages


def trial_kind(name: str) -> TrialKind:
    """The registered kind ``name``; an unknown one is a one-line error naming the valid ones."""
    load_plugins()  # kinds registered by SWEEPER_PLUGINS / entry points (once per process)
    if name not in TRIAL_KINDS:
        raise ConfigError(f"kind={name!r} is invalid: must be one of {', '.join(TRIAL_KINDS)}")
    return TRIAL_KINDS[name]


def config_class(kind: str):
    """The config dataclass of a trial kind."""
    return trial_kind(kind).config()


def make_config(d: dict[str, Any]):
    """A validated config from a dict; ``kind`` (default network) picks the class."""
    cls = config_class(d.get("kind", "network"))
    if "kind" not in cls.__dataclass_fields__:  # a class without the field is the kind's one class
        d = {k: v for k, v in d.items() if k != "kind"}
    return cls.from_dict(d)


def run_any(cfg, **kwargs):
    """Run a trial of any kind (network trials accept :func:`run_trial`'s keyword arguments)."""
    return trial_kind(getattr(cfg, "kind", "network")).run(cfg, **kwargs)


__all__ = [
    "KINDS",
    "TRIAL_KINDS",
    "ConfigError",
    "TrialKind",
    "register_kind",
    "trial_kind",
    "SweeperError",
    "Trial",
    "TrialConfig",
    "TrialResult",
    "config_class",
    "load_plugins",
    "make_config",
    "run_any",
    "run_trial",
]
