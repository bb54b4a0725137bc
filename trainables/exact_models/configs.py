"""The closed-form trials' configs (the kernel trial of Sec. 3, the linear trial of Sec. 4), declared apart from
their computation (:mod:`.kernel`, :mod:`.linear`): reading every trial kind's fields (a sweep's table, ``--help``)
then imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from trainables.config import SEED, ConfigFields
from trainables.data.datasets import DATASETS
from trainables.fields import Flag, Interval, Options, Ref, Text, field, validate


@dataclass(frozen=True)
class KernelConfig(ConfigFields):
    """One KRR poisoning trial (RBF kernel)."""

    _label = "kernel-trial"

    kind: str = field("kernel", Options(("kernel",)), "Fixed: tells sweeps which trial to run")
    data: str = field(
        "gaussian",
        Options(("gaussian", "digits")),
        "Clean inputs: gaussian N(0, I_p), or digits flattened and standardised",
        group="attack",
    )
    n_clean: int = field(200, Interval(int, 1, 20_000), "Clean training points")
    dim: int = field(10, Interval(int, 1, 10_000), "Input dimension p (gaussian data; digits is 64)")
    m: int = field(8, Interval(int, 0, 100_000), "Cloned poisons", group="attack")
    ell: float = field(1.0, Interval(float, 0, 1e6, closed="right"), "RBF length scale")
    lam: float = field(
        0.01, Interval(float, 0, 1e6, closed="right"), "Ridge per sample: alpha = (K + n lam I)^-1 y, c = n lam (eq 7)"
    )
    kappa: float = field(
        0.0, Interval(float, 0, 1e12), "Gradient-penalty strength of eq 26 (0: plain KRR)", group="defence"
    )
    r: float = field(
        0.5, Interval(float, 0, 1e6), "||x0 - zeta||: the trigger point's distance from the poisons", group="attack"
    )
    zeta_dist: float = field(
        8.0,
        Interval(float, 0, 1e6),
        "||zeta|| in units of ell: the poison cluster's distance from the clean data",
        group="attack",
    )
    jitter: float = field(
        0.0,
        Interval(float, 0, 1e6),
        "Poisons uniform in a ball of this radius around zeta (0: exact clones)",
        group="attack",
    )
    y_t: float = field(1.0, Interval(float, -1e6, 1e6), "The poisons' (target) label", group="attack")
    seed: int = field(0, SEED, "Seed of the clean data, directions and jitter")

    def __post_init__(self) -> None:
        validate(self)


def _side(cfg) -> int:
    return DATASETS[cfg.dataset].shape[1]


_SIDE = Ref("image side", _side)


@dataclass(frozen=True)
class LinearConfig(ConfigFields):
    """One linear-regression poisoning trial."""

    _label = "linear-trial"

    kind: str = field("linear", Options(("linear",)), "Fixed: tells sweeps which trial to run")
    dataset: str = field(
        "digits",
        Options(lambda: tuple(n for n, e in DATASETS.items() if e.shape[0] == 1)),  # the registry's grey ones
        "Grey-image dataset",
        group="attack",
    )
    data_dir: str = field("~/.cache/sweeper/data", Text(), "Folder holding the MNIST IDX files")
    verify_checksums: bool = field(True, Flag(), "Check every dataset file against its published md5")
    theta: float = field(
        0.1, Interval(float, 0, 1, closed="left"), "Poison fraction of the non-target training images", group="attack"
    )
    target: int = field(0, Interval(int, 0, 9), "Target class", group="attack")
    trigger_size: int | None = field(
        None,
        Interval(int, 1, _SIDE),
        "Square trigger's side",
        unit="px",
        derived="2 on 8x8, 4 otherwise",
        group="attack",
    )
    trigger_margin: int | None = field(
        None,
        Interval(int, 0, Ref("image side - trigger_size", lambda c: _side(c) - c.trigger_size)),
        "Distance from the lower-right corner",
        unit="px",
        derived="0 on 8x8, 1 otherwise",
        group="attack",
    )
    seed: int = field(0, SEED, "Seed of the poisoning decisions")

    def __post_init__(self) -> None:
        validate(
            self, lambda cfg, key: (2 if _side(cfg) < 16 else 4) if key == "trigger_size" else int(_side(cfg) >= 16)
        )
