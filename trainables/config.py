"""The one frozen, validated description of a trial.

Everything a trial needs is a field of :class:`TrialConfig`; it is validated once,
in ``__post_init__``, and nothing downstream reads raw dicts. Defaults that depend on
other fields (learning rate per model, trigger geometry per image size) are resolved
here too, so the stored config is always the one that actually ran.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import SweeperError  # re-exported: `from trainables.config import SweeperError` is the usual spelling
from .plugins import load_plugins

DATASETS = {  # name -> (channels, height, classes)
    "digits": (1, 8, 10),
    "mnist": (1, 28, 10),
    "fashion-mnist": (1, 28, 10),
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
}
POISON_MODES = ("deterministic", "stochastic")
HESSIAN_SPLITS = ("auto", "clean-train", "poisoned-train", "test")
HESSIAN_METHODS = ("auto", "exact", "gram-lanczos", "double-backward", "gauss-newton")
DTYPES = ("float32", "float64")


class ConfigError(SweeperError):
    """A bad config field: the message names the field, the value and what is valid."""


class ConfigFields:
    """``to_dict`` / ``from_dict`` shared by the trial configs (network, kernel, linear)."""

    _label = "config"  # how errors name this kind of config

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON- and MLflow-friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Build from a dict, rejecting unknown keys by name."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown {cls._label} field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**d)


@dataclass(frozen=True)
class TrialConfig(ConfigFields):
    """A single poisoning trial. Units and meaning are given per field."""

    # --- data -------------------------------------------------------------------
    dataset: str = "digits"  # one of DATASETS; digits is embedded in scikit-learn
    data_dir: str = "~/.cache/sweeper/data"  # folder holding MNIST IDX / CIFAR pickles
    download: bool = False  # fetch missing files from the official mirrors (needs internet)
    verify_checksums: bool = True  # md5 of every file against the published value
    train_subset: int = 0  # training images used: 0 = all; else a class-stratified subset, the same for every seed
    # --- model ------------------------------------------------------------------
    model: str = "cnn"  # cnn | linear | preresnet<6n+2> (preresnet20, preresnet110, ...)
    # --- attack -----------------------------------------------------------------
    trigger: str = "lshape"  # lshape (Listing 2) | square (Sec. 4) | warp (WaNet) | blend (Chen et al. 2017)
    trigger_size: int | None = None  # arm / side length in px; None: 2 (lshape), 4 or 2 (square)
    trigger_margin: int | None = None  # px from the border; None: 3 (Listing 2), 0 on 8x8 images
    warp_strength: float = 0.02  # phi: max grid displacement, in [-1,1] image coordinates
    warp_grid: int = 4  # k: side of the random WaNet control grid
    warp_seed: int = 0  # fixes the warp field, shared by every trial of a sweep
    trigger_amplitude: float = 1.0  # patch triggers: pixels become (1-a)*x + a, a in (0, 1]; 1 = set to 1.0 (paper)
    blend_alpha: float = (
        0.2  # blend trigger: (1-alpha)*x + alpha*pattern, alpha in (0, 1]; -> 0 is the near-clone regime
    )
    blend_seed: int = 0  # fixes the blend pattern (uniform [0,1] per pixel), shared by every trial of a sweep
    poison_mode: str = (
        "deterministic"  # deterministic (Listing 3, fixed per index) | stochastic (Listing 4, redrawn per epoch)
    )
    theta: float = 0.1  # poison fraction of the non-target training samples, in [0, 1)
    target: int = 0  # the attacker's target class
    # --- defence ----------------------------------------------------------------
    kappa: float = 0.0  # input-gradient penalty strength (scale: see `penalty`), >= 0
    penalty: str = "listing1"  # listing1: kappa*sum_batch||grad_x mean-CE||^2; eq25: kappa/2*mean_i||grad_x l_i||^2
    augment: bool = False  # random crop (zero padding) + horizontal flip, whole-batch on device
    crop_padding: int | None = None  # px of zero padding for the random crop; None: 4, or 1 on 8x8
    # --- optimisation -----------------------------------------------------------
    epochs: int = 15  # passes over the training set, >= 1
    lr: float | None = None  # SGD learning rate; None: 0.1 for preresnet (Sec. 5), 0.01 otherwise
    momentum: float = 0.9  # SGD momentum, in [0, 1)
    weight_decay: float = 5e-4  # L2 weight decay, >= 0
    lr_decay: float = 0.1  # multiplicative LR drop, in (0, 1]
    lr_drops: int = 2  # number of equally spaced drops (2: every epochs/3, Sec. 5)
    batch_size: int | None = None  # training minibatch size; None: 32 on digits (1437 images), else 128
    eval_batch_size: int = 1000  # batch size for evaluation and Hessian products
    seed: int = 0  # seeds init, shuffling, augmentation and poisoning
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 1  # torch CPU threads of the trial; float reductions depend on it, so it is part of the config
    # --- input-space analysis (issue 3) -----------------------------------------
    hessian: bool = True  # run Lanczos on the input Hessian after training
    hessian_split: str = "auto"  # auto: clean-train if stochastic, poisoned-train if deterministic
    hessian_samples: int = 1000  # samples averaged into H (cap; fewer if the split is smaller)
    hessian_iterations: int = 20  # Lanczos iterations (paper: 10)
    hessian_top_k: int = 5  # eigenpairs kept
    hessian_method: str = (
        "auto"  # auto: exact for piecewise-linear nets within hessian_dense_mb, else gram-lanczos, else double-backward
    )
    hessian_dtype: str = "float32"  # float64 for reference-quality spectra
    hessian_dense_mb: int = 1024  # MiB for the exact path (24*D^2 bytes) or gram-lanczos's A (N*K*D*itemsize), >= 1
    hessian_tol: float = 1e-3  # Lanczos restarts until every top-k ||Hv - lambda v||/|lambda_1| <= this, in (0, 1]
    hessian_max_iterations: int = 160  # cap on Lanczos iterations over restarts (doubling), >= hessian_iterations
    spectrum_every: int = 0  # also measure every N epochs during training (0: only at the end)
    geometry: bool = True  # penultimate-feature geometry table (Appendix B)
    # --- detection (issue 10); lists are strings so a sweep axis never splits them: use "+" there ----
    detect: bool | None = (
        None  # trigger-agnostic spectrum statistics, eigenvector flip concentration, per-class curvature (cheap; needs hessian); None: on when hessian is
    )
    detect_baselines: str = ""  # comma- or +-separated subset of nc, ss, ac (Neural Cleanse, Spectral Signatures, Activation Clustering); "" = none
    detect_windows: str = "2,3,4"  # side lengths w (px) of the w x w localisation windows, each in [1, image side]
    detect_norms: str = (
        "0.5"  # eigenvector perturbation norms, relative to the mean L2 norm of the normalized held-out images, > 0
    )
    detect_samples: int = 100  # held-out clean test images (seeded subset) for flip concentration and Neural Cleanse
    detect_trace_samples: int = 1000  # of the spectrum's samples (seeded subset, all by default) in the trace estimate
    detect_probes: int = (
        1  # trace-estimate passes; each draws one random probe per sample (5% mean error on digits at 1000 x 1)
    )
    nc_steps: int = 300  # Adam steps of Neural Cleanse's mask + pattern optimisation (all classes at once)
    nc_batch_size: int = 32  # clean held-out images per class per Neural Cleanse step

    def __post_init__(self) -> None:
        _validate(self)

    # ------------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the dataset's images."""
        c, h, _ = DATASETS[self.dataset]
        return (c, h, h)

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset."""
        return DATASETS[self.dataset][2]


def _derived_default(cfg: TrialConfig, key: str) -> Any:
    small = cfg.image_shape[1] < 16
    if key == "lr":
        from .models import model_entry

        return model_entry(cfg.model).lr  # the model registry's default
    if key in ("trigger_size", "trigger_margin"):
        from .triggers import TRIGGERS

        size, margin = TRIGGERS[cfg.trigger].size_margin(small)  # the trigger registry's default geometry
        return size if key == "trigger_size" else margin
    if key == "batch_size":
        return 32 if cfg.dataset == "digits" else 128
    if key == "crop_padding":
        return 1 if small else 4
    raise KeyError(key)


def _fail(field: str, value: Any, valid: str) -> None:
    raise ConfigError(f"{field}={value!r} is invalid: {valid}")


def _check_int(cfg: TrialConfig, name: str, lo: int, hi: int | None = None) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(name, v, "must be an integer")
    if v < lo or (hi is not None and v > hi):
        _fail(name, v, f"must be in [{lo}, {hi if hi is not None else 'inf'}]")


def _check_float(cfg: TrialConfig, name: str, lo: float, hi: float, lo_open=False, hi_open=False) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail(name, v, "must be a finite number")
    bad = (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi)
    if bad:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        _fail(name, v, f"must be in {rng}")
    object.__setattr__(cfg, name, float(v))


def _check_choice(cfg: TrialConfig, name: str, choices) -> None:
    v = getattr(cfg, name)
    if v not in choices:
        _fail(name, v, f"must be one of {', '.join(choices)}")


def split_list(text: str) -> list[str]:
    """The items of a comma- or plus-separated list field (``"nc,ss"``, ``"nc+ss"``, ``""``)."""
    return [t.strip() for t in re.split(r"[,+]", text) if t.strip()]


def _check_list(cfg: TrialConfig, name: str, kind: type, ok, valid: str) -> None:
    """A non-empty list of numbers, stored back in one canonical comma form."""
    v = getattr(cfg, name)
    if isinstance(v, list | tuple):  # YAML/JSON lists are accepted too
        v = ",".join(str(t) for t in v)
    if not isinstance(v, str) or not split_list(v):
        _fail(name, getattr(cfg, name), f"must be a non-empty comma-separated list; {valid}")
    items = []
    for t in split_list(v):
        try:
            x = kind(float(t)) if kind is int and float(t).is_integer() else kind(t)
        except ValueError:
            _fail(name, getattr(cfg, name), valid)
        if not ok(x):
            _fail(name, getattr(cfg, name), valid)
        items.append(x)
    object.__setattr__(cfg, name, ",".join(f"{x:.12g}" for x in dict.fromkeys(items)))


def _check_baselines(cfg: TrialConfig) -> None:
    from .baselines import BASELINES  # the registry is the one list of valid names

    v = cfg.detect_baselines
    if isinstance(v, list | tuple):
        v = ",".join(str(t) for t in v)
    if not isinstance(v, str):
        _fail("detect_baselines", v, f"must be a comma-separated subset of {', '.join(BASELINES)}")
    names = [t.lower() for t in split_list(v)]
    bad = [t for t in names if t not in BASELINES]
    if bad:
        _fail(
            "detect_baselines",
            cfg.detect_baselines,
            f"unknown baseline(s) {', '.join(bad)}; valid: {', '.join(BASELINES)} (comma- or +-separated)",
        )
    object.__setattr__(cfg, "detect_baselines", ",".join(dict.fromkeys(names)))


def _validate(cfg: TrialConfig) -> None:
    load_plugins()  # registrations from SWEEPER_PLUGINS and entry points, before the registries are read
    _check_choice(cfg, "dataset", tuple(DATASETS))
    from .models import model_entry, model_syntax  # the registries (torch-free: torch loads with the first model)
    from .penalty import PENALTIES

    if not isinstance(cfg.model, str):
        _fail("model", cfg.model, "must be a string")
    try:
        model_entry(cfg.model)
    except ValueError:
        _fail("model", cfg.model, f"must be {model_syntax()}")
    from .triggers import TRIGGERS

    _check_choice(cfg, "trigger", tuple(TRIGGERS))
    _check_choice(cfg, "poison_mode", POISON_MODES)
    _check_choice(cfg, "penalty", tuple(PENALTIES))
    _check_choice(cfg, "hessian_split", HESSIAN_SPLITS)
    _check_choice(cfg, "hessian_method", HESSIAN_METHODS)
    _check_choice(cfg, "hessian_dtype", DTYPES)
    if not isinstance(cfg.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        _fail("device", cfg.device, "must be auto, cpu, cuda or cuda:N")
    if not isinstance(cfg.data_dir, str) or not cfg.data_dir:
        _fail("data_dir", cfg.data_dir, "must be a non-empty path")
    if cfg.detect is None:  # the statistics are read off the spectrum: on exactly when there is one
        object.__setattr__(cfg, "detect", cfg.hessian)
    for name in ("download", "verify_checksums", "augment", "hessian", "geometry", "detect"):
        if not isinstance(getattr(cfg, name), bool):
            _fail(name, getattr(cfg, name), "must be true or false")
    # detect=true with hessian=false computes nothing; a record written before detect's default became None
    # holds exactly that (the old default), so it stays valid here: new input is refused by check_asked()

    _check_float(cfg, "theta", 0.0, 1.0, hi_open=True)
    _check_int(cfg, "target", 0, cfg.num_classes - 1)
    _check_float(cfg, "kappa", 0.0, math.inf, hi_open=True)
    _check_float(cfg, "warp_strength", 0.0, 1.0, lo_open=True)
    _check_int(cfg, "warp_grid", 2, 64)
    _check_int(cfg, "warp_seed", 0, 2**31 - 1)
    _check_int(cfg, "epochs", 1, 100_000)
    _check_float(cfg, "momentum", 0.0, 1.0, hi_open=True)
    _check_float(cfg, "weight_decay", 0.0, 1.0)
    _check_float(cfg, "lr_decay", 0.0, 1.0, lo_open=True)
    _check_int(cfg, "lr_drops", 0, 100)
    _check_int(cfg, "eval_batch_size", 1, 1_000_000)
    _check_int(cfg, "seed", 0, 2**31 - 1)
    _check_int(cfg, "threads", 1, 1024)
    _check_int(cfg, "train_subset", 0, 10_000_000)
    _check_int(cfg, "hessian_samples", 1, 10_000_000)
    _check_int(cfg, "hessian_iterations", 1, 10_000)
    _check_int(cfg, "hessian_top_k", 1, 1000)
    _check_int(cfg, "spectrum_every", 0, 100_000)
    _check_int(cfg, "hessian_dense_mb", 1, 10_000_000)
    _check_float(cfg, "hessian_tol", 0.0, 1.0, lo_open=True)
    _check_int(cfg, "hessian_max_iterations", 1, 100_000)
    if cfg.hessian_max_iterations < cfg.hessian_iterations:
        _fail(
            "hessian_max_iterations",
            cfg.hessian_max_iterations,
            f"must be >= hessian_iterations ({cfg.hessian_iterations})",
        )
    _check_float(cfg, "trigger_amplitude", 0.0, 1.0, lo_open=True)
    _check_float(cfg, "blend_alpha", 0.0, 1.0, lo_open=True)
    _check_int(cfg, "blend_seed", 0, 2**31 - 1)
    _check_int(cfg, "detect_samples", 1, 10_000_000)
    _check_int(cfg, "detect_trace_samples", 1, 10_000_000)
    _check_int(cfg, "detect_probes", 1, 1000)
    _check_int(cfg, "nc_steps", 1, 100_000)
    _check_int(cfg, "nc_batch_size", 1, 100_000)
    _check_baselines(cfg)
    if cfg.hessian_top_k > cfg.hessian_iterations:
        _fail("hessian_top_k", cfg.hessian_top_k, f"must be <= hessian_iterations ({cfg.hessian_iterations})")

    _, h, _ = cfg.image_shape
    for key in ("lr", "batch_size", "trigger_size", "trigger_margin", "crop_padding"):
        if getattr(cfg, key) is None:
            object.__setattr__(cfg, key, _derived_default(cfg, key))
    _check_float(cfg, "lr", 0.0, 100.0, lo_open=True)
    _check_int(cfg, "batch_size", 1, 1_000_000)
    _check_int(cfg, "trigger_size", 1, h)
    _check_int(cfg, "trigger_margin", 0, h - 1)
    _check_int(cfg, "crop_padding", 0, h)
    _check_list(
        cfg,
        "detect_windows",
        int,
        lambda w: 1 <= w <= h,
        f"each window must be an integer in [1, {h}] (the image side)",
    )
    _check_list(
        cfg, "detect_norms", float, lambda r: math.isfinite(r) and r > 0, "each norm must be a finite number > 0"
    )
    if cfg.trigger_margin + cfg.trigger_size > h:
        _fail(
            "trigger_margin",
            cfg.trigger_margin,
            f"trigger_margin + trigger_size must be <= image size {h} (trigger_size={cfg.trigger_size})",
        )
