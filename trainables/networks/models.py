"""The model registry: one :class:`ModelEntry` per model family (``cnn``, ``linear``, ``preresnet<6n+2>``).

Config validation, the CLI's help, ``sweeper plan``'s cost model and every trial read
:data:`MODELS`. This module imports no torch: the networks themselves live in
:mod:`trainables.networks.nets` and load when a model is first built, so the registry's names are cheap to
read (``sweeper --help``). ``trainables.networks.models.SmallCNN`` etc. still work.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainables.plugins import load_plugins

if TYPE_CHECKING:
    from torch import nn

    from trainables.networks.nets import LinearModel, PreActBlock, PreResNet, SmallCNN  # noqa: F401

_NETS = ("LinearModel", "SmallCNN", "PreActBlock", "PreResNet")


def __getattr__(name: str):
    if name in _NETS:  # the networks load (with torch) on first use
        from trainables.networks import nets

        return getattr(nets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class ModelEntry:
    """A model family in the registry: how its names read, how it is built and what a step costs."""

    family: str  # registry key (cnn, linear, preresnet)
    build: Callable[[str, tuple[int, int, int], int], nn.Module]  # (name, (C, H, W), classes) -> module
    accepts: Callable[[str], bool]  # whether a model name belongs to this family (preresnet20, preresnet110...)
    cost: Callable[[str], float]  # rough CPU seconds per training sample on a 3x32x32 image (sweeper plan)
    syntax: str  # how its names read in messages: cnn, preresnet<6n+2>
    lr: float = 0.01  # default SGD learning rate (0.05 diverges for the small nets on digits at kappa >= 10)


MODELS: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    """Add a model family: config validation, the CLI, ``sweeper plan``'s cost model and trials read this."""
    MODELS[entry.family] = entry
    return entry


def model_entry(name: str) -> ModelEntry:
    """The family that builds model ``name``; an unknown name is an error naming the valid ones."""
    load_plugins()  # families registered by SWEEPER_PLUGINS / entry points (once per process)
    for entry in MODELS.values():
        if entry.accepts(name):
            return entry
    raise ValueError(f"model={name!r} is invalid: must be {model_syntax()}")


def model_syntax() -> str:
    """``cnn, linear or preresnet<6n+2> (...)``: the registered names, for messages and help."""
    names = [e.syntax for e in MODELS.values()]
    return (", ".join(names[:-1]) + " or " + names[-1]) if len(names) > 1 else names[0]


def make_model(name: str, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build a registered model by name (``cnn``, ``linear``, ``preresnet<6n+2>``...)."""
    return model_entry(name).build(name, in_shape, num_classes)


def _nets():
    from trainables.networks import nets  # torch loads here, with the first model built

    return nets


def _preresnet_depth(name: str) -> int | None:
    m = re.fullmatch(r"preresnet(\d+)", name) if isinstance(name, str) else None
    depth = int(m.group(1)) if m else None
    return depth if depth is not None and depth >= 8 and (depth - 2) % 6 == 0 else None


# CPU costs per 3x32x32 sample (train step, measured in benchmarks/train_step.py); scaled by pixels in plan
register_model(
    ModelEntry("cnn", lambda n, s, k: _nets().SmallCNN(s, k), lambda n: n == "cnn", lambda n: 1.4e-4 * 48, "cnn")
)
register_model(
    ModelEntry(
        "linear", lambda n, s, k: _nets().LinearModel(s, k), lambda n: n == "linear", lambda n: 2e-5 * 48, "linear"
    )
)
register_model(
    ModelEntry(
        "preresnet",
        lambda n, s, k: _nets().PreResNet(_preresnet_depth(n), s, k),
        lambda n: _preresnet_depth(n) is not None,
        lambda n: 2.1e-3 / 20 * _preresnet_depth(n),
        "preresnet<depth = 6n+2 >= 8> (e.g. preresnet20)",
        lr=0.1,
    )
)  # Sec. 5
