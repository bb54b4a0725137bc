"""Pure PyTorch trial code: data, triggers, poisoning, models, penalty, Hessian, training,
and the paper's exact models (kernel ridge regression, linear regression).

Nothing here imports Ray or MLflow; the orchestration layer drives :class:`~trainables.train.Trial`
or calls :func:`run_any` for the closed-form trial kinds.
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError, SweeperError, TrialConfig
from .train import Trial, TrialResult, run_trial

KINDS = ("network", "kernel", "linear")


def config_class(kind: str):
    """The config dataclass of a trial kind."""
    if kind == "network":
        return TrialConfig
    if kind == "kernel":
        from .kernel import KernelConfig

        return KernelConfig
    if kind == "linear":
        from .linear import LinearConfig

        return LinearConfig
    raise ConfigError(f"kind={kind!r} is invalid: must be one of {', '.join(KINDS)}")


def make_config(d: dict[str, Any]):
    """A validated config from a dict; ``kind`` (default network) picks the class."""
    kind = d.get("kind", "network")
    cls = config_class(kind)
    if kind == "network":
        d = {k: v for k, v in d.items() if k != "kind"}
    return cls.from_dict(d)


def run_any(cfg, **kwargs) -> TrialResult:
    """Run a trial of any kind (network trials accept :func:`run_trial`'s keyword arguments)."""
    kind = getattr(cfg, "kind", "network")
    if kind == "kernel":
        from .kernel import run_kernel_trial

        return run_kernel_trial(cfg)
    if kind == "linear":
        from .linear import run_linear_trial

        return run_linear_trial(cfg)
    return run_trial(cfg, **kwargs)


__all__ = ["KINDS", "ConfigError", "SweeperError", "Trial", "TrialConfig", "TrialResult", "config_class",
           "make_config", "run_any", "run_trial"]
