"""The one frozen, validated description of a trial.

Everything a trial needs is a field of :class:`TrialConfig`, declared once with
:func:`trainables.fields.field` (constraint, unit, help, group); validation, the ``sweeper trial``
options and their help ranges, ``--set`` parsing and the record's defaults are derived from those
declarations. Defaults that depend on other fields (learning rate per model, trigger geometry per
image size) are resolved here too, so the stored config is always the one that actually ran.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

from trainables.data.datasets import DATASETS
from trainables.errors import (
    SweeperError,  # re-exported: `from trainables.config import SweeperError` is the usual spelling
)
from trainables.fields import (
    EXTRA_FIELDS,
    RESERVED,
    Check,
    ConfigError,
    Flag,
    Interval,
    NumberList,
    Options,
    Ref,
    Subset,
    Text,
    fail,
    field,
    specs,
    split_list,
    validate,
)
from trainables.plugins import load_plugins

__all__ = ["DATASETS", "ConfigError", "ConfigFields", "SweeperError", "TrialConfig", "split_list", "threat_fields"]

SEED = Interval(int, 0, 2**31 - 1)
# one field declaration per group: the group is the `trial --help` panel; "attack" is the threat of a defence search
DATA, MODEL, ATTACK, DEFENCE, OPTIM, SPECTRUM, DETECTION = (
    partial(field, group=g) for g in ("data", "model", "attack", "defence", "optimisation", "spectrum", "detection")
)
SIDE = Ref("image side", lambda c: c.image_shape[1])
_ITERS = Ref("hessian_iterations", lambda c: c.hessian_iterations)


def _registry(module: str, name: str):
    """A registry's names, read at each check (plugins may add to it); the modules import no torch."""

    def names() -> list[str]:
        from importlib import import_module

        return list(getattr(import_module(f"trainables.{module}"), name))

    return names


def _model_ok(name: str) -> bool:
    from trainables.networks.models import model_entry

    try:
        model_entry(name)
    except ValueError:
        return False
    return True


def _model_syntax() -> str:
    from trainables.networks.models import model_syntax

    return model_syntax()


def _filters() -> list[str]:
    from importlib import import_module  # by name: the registry sits above the config (detection)

    return import_module("trainables.detection.filtering").filter_names()


def _filter_help() -> str:
    from importlib import import_module

    return import_module("trainables.detection.filtering").filter_help()


def _penalties() -> str:
    from trainables.defence.penalty import PENALTIES

    docs = {k: (fn.__doc__ or "").strip().splitlines() for k, fn in PENALTIES.items()}
    return "; ".join(f"{k} = {d[0]}" if d else k for k, d in docs.items())


class ConfigFields:
    """``to_dict`` / ``from_dict`` shared by the trial configs (network, kernel, linear).

    A class with ``_takes_extras`` also holds the fields plugins declared (``fields.EXTRA_FIELDS``) in
    its ``extra`` mapping; they read as attributes and are flat in ``to_dict`` like every other field.
    """

    _label = "config"  # how errors name this kind of config
    _takes_extras = False

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON- and MLflow-friendly)."""
        d = dataclasses.asdict(self)
        d.update(d.pop("extra", {}))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Build from a dict, rejecting unknown keys by name."""
        load_plugins()  # a plugin's fields are valid keys once its registrations ran
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extras = set(EXTRA_FIELDS) if cls._takes_extras else set()
        unknown = sorted(set(d) - names - extras)
        if unknown:
            raise ConfigError(f"unknown {cls._label} field(s) {unknown}; valid fields: {sorted(names | extras)}")
        kw = {k: v for k, v in d.items() if k in names}
        if extras:
            kw["extra"] = {k: v for k, v in d.items() if k in extras}
        return cls(**kw)

    def __getattr__(self, name: str) -> Any:  # only reached for names that are not dataclass fields
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__!r} has no field {name!r}")


@dataclass(frozen=True)
class TrialConfig(ConfigFields):
    """A single poisoning trial. Each field's unit, range and meaning is its declaration."""

    _takes_extras = True

    # --- data -------------------------------------------------------------------
    dataset: str = DATA(
        "digits",
        Options(lambda: tuple(DATASETS)),  # the dataset registry (trainables/data/datasets.py)
        "Dataset; digits ships with scikit-learn, the others are read from data_dir",
    )
    data_dir: str = DATA("~/.cache/sweeper/data", Text(), "Folder holding the MNIST IDX / CIFAR pickle files")
    download: bool = DATA(False, Flag(), "Fetch missing dataset files from the official mirrors (needs internet)")
    verify_checksums: bool = DATA(True, Flag(), "Check every dataset file against its published md5")
    train_subset: int = DATA(
        0,
        Interval(int, 0, 10_000_000),
        "Training images used: 0 = all, else a class-stratified subset, the same for every seed",
    )
    # --- model ------------------------------------------------------------------
    model: str = MODEL("cnn", Check(_model_ok, _model_syntax), "A registered model")
    # --- attack -----------------------------------------------------------------
    trigger: str = ATTACK("lshape", Options(_registry("attack.triggers", "TRIGGERS")), "Backdoor trigger")
    trigger_size: int | None = ATTACK(
        None,
        Interval(int, 1, SIDE),
        "Patch trigger's arm / side length",
        unit="px",
        derived="2 for lshape; square 4, or 2 on 8x8",
    )
    trigger_margin: int | None = ATTACK(
        None,
        Interval(int, 0, Ref("image side - trigger_size", lambda c: c.image_shape[1] - c.trigger_size)),
        "Patch trigger's distance from the border",
        unit="px",
        derived="3 for lshape, 1 for square; 0 on 8x8",
    )
    warp_strength: float = ATTACK(
        0.02,
        Interval(float, 0, 1, closed="right"),
        "WaNet strength phi: max grid displacement in [-1,1] image coordinates",
    )
    warp_grid: int = ATTACK(4, Interval(int, 2, 64), "WaNet control grid side k")
    warp_seed: int = ATTACK(0, SEED, "Seed of the WaNet warp field, shared by every trial of a sweep")
    trigger_amplitude: float = ATTACK(
        1.0,
        Interval(float, 0, 1, closed="right"),
        "Patch triggers: pixels become (1-a)*x + a; 1 sets them to 1.0 (paper)",
    )
    blend_alpha: float = ATTACK(
        0.2,
        Interval(float, 0, 1, closed="right"),
        "Blend trigger strength alpha: (1-alpha)*x + alpha*pattern; toward 0 is the near-clone regime",
    )
    blend_seed: int = ATTACK(0, SEED, "Seed of the blend trigger's uniform random pattern")
    sig_delta: float = ATTACK(
        0.1,
        Interval(float, 0, 1, closed="right"),
        "SIG trigger amplitude Delta: x + Delta*sin(2 pi f j / W) along each row, clipped to [0, 1]",
    )
    sig_frequency: int | None = ATTACK(
        None,
        Interval(int, 1, Ref("image side / 2 - 1", lambda c: c.image_shape[2] // 2 - 1)),
        "SIG trigger's periods across the image width (Barni et al.: 6); below half the width, where the "
        "sinusoid vanishes at every pixel",
        derived="6, or 2 on 8x8, for the sig trigger; unset for the others",
    )
    poison_mode: str = ATTACK(
        "deterministic",
        Options(("deterministic", "stochastic")),
        "deterministic: fixed per index (Listing 3); stochastic: redrawn every epoch (Listing 4)",
    )
    theta: float = ATTACK(
        0.1,
        Interval(float, 0, 1, closed="left"),
        "Poison fraction of the eligible training samples: the non-target ones (all of them under all-to-all; "
        "the target class's under a clean-label trigger such as sig)",
    )
    target: int = ATTACK(
        0, Interval(int, 0, Ref("classes - 1", lambda c: c.num_classes - 1)), "Target class of the backdoor"
    )
    cover_fraction: float = ATTACK(
        0.0,
        Interval(float, 0, 1, closed="left"),
        "Adaptive attack: this fraction of the eligible samples not poisoned also carry the trigger with their "
        "true label (cover samples), so the trigger is no longer specific to the target class; none at theta 0",
    )
    target_mode: str = ATTACK(
        "all-to-one",
        Options(("all-to-one", "all-to-all")),
        "all-to-one: triggered images are labelled target; all-to-all: a triggered image of class y is "
        "labelled (y+1) mod K, and ASR counts test images of every class sent to (y+1) mod K",
    )
    # --- defence ----------------------------------------------------------------
    kappa: float = DEFENCE(0.0, Interval(float, 0, None), "Input-gradient penalty strength (scale set by penalty)")
    penalty: str = DEFENCE(
        "listing1", Options(_registry("defence.penalty", "PENALTIES"), _penalties), "Input-gradient penalty"
    )
    augment: bool = DEFENCE(False, Flag(), "Random crop + horizontal flip, whole-batch on the device")
    crop_padding: int | None = DEFENCE(
        None, Interval(int, 0, SIDE), "Zero padding of the random crop", unit="px", derived="4, or 1 on 8x8"
    )
    defence_filter: str = DEFENCE(
        "none",
        Options(_filters, _filter_help),
        "Filter and retrain: after training, score every training sample, remove the most suspicious "
        "(filter_fraction, filter_scope) and train again from scratch with the same seed, kappa and augmentation "
        "(the defender holds the training set)",
    )
    filter_fraction: float = DEFENCE(
        0.1,
        Interval(float, 0, 0.5, closed="right"),
        "Share of the training set a filter removes (ignored without a defence_filter)",
    )
    filter_scope: str = DEFENCE(
        "class",
        Options(_registry("detection.filtering", "SCOPES")),
        "Where a filter removes from: class = the highest-scoring samples of the class it suspects, at most half "
        "of it (all-to-one poisons share one label); pooled = the highest scores of the whole training set",
    )
    # --- optimisation -----------------------------------------------------------
    epochs: int = OPTIM(15, Interval(int, 1, 100_000), "Passes over the training set")
    lr: float | None = OPTIM(
        None, Interval(float, 0, 100, closed="right"), "SGD learning rate", derived="0.1 for preresnet, 0.01 otherwise"
    )
    momentum: float = OPTIM(0.9, Interval(float, 0, 1, closed="left"), "SGD momentum")
    weight_decay: float = OPTIM(5e-4, Interval(float, 0, 1), "L2 weight decay")
    lr_decay: float = OPTIM(0.1, Interval(float, 0, 1, closed="right"), "Multiplicative learning-rate drop")
    lr_drops: int = OPTIM(2, Interval(int, 0, 100), "Equally spaced learning-rate drops (2: every epochs/3, Sec. 5)")
    batch_size: int | None = OPTIM(
        None, Interval(int, 1, 1_000_000), "Training minibatch size", derived="32 on digits, else 128"
    )
    eval_every: int = OPTIM(
        1,
        Interval(int, 1, 100_000),
        "Evaluate (clean accuracy, ASR, train accuracy, Fisher trace) every N epochs and at the end of each "
        "training; on small MNIST subsets evaluating the 10 000 test images costs several epochs",
    )
    eval_batch_size: int = OPTIM(
        1000,
        Interval(int, 1, 1_000_000),
        "Batch size of Hessian products and of evaluation on a GPU (on the CPU, forward passes take at most 128 "
        "images: faster there, the same logits)",
    )
    seed: int = OPTIM(0, SEED, "Seed of init, shuffling, augmentation and poisoning")
    device: str = OPTIM("auto", Text(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N"), "Torch device")
    threads: int = OPTIM(
        1,
        Interval(int, 1, 1024),
        "Torch CPU threads; float reductions depend on it, so it is part of the config (sweeps: --cpus-per-trial)",
    )
    # --- input-space analysis ----------------------------------------------------
    hessian: bool = SPECTRUM(True, Flag(), "Input-Hessian spectrum and trigger overlap after training")
    hessian_split: str = SPECTRUM(
        "auto",
        Options(("auto", "clean-train", "poisoned-train", "test")),
        "Data averaged into H (auto: clean-train if stochastic, poisoned-train if deterministic)",
    )
    hessian_samples: int = SPECTRUM(1000, Interval(int, 1, 10_000_000), "At most this many samples averaged into H")
    hessian_iterations: int = SPECTRUM(20, Interval(int, 1, 10_000), "Lanczos iterations (paper: 10)")
    hessian_top_k: int = SPECTRUM(5, Interval(int, 1, _ITERS), "Eigenpairs kept")
    hessian_method: str = SPECTRUM(
        "auto",
        Options(("auto", "exact", "gram-lanczos", "double-backward", "gauss-newton")),
        "Spectrum path: exact (Jacobians + eigh, piecewise-linear nets), gram-lanczos, or HVP Lanczos "
        "(double-backward, gauss-newton); auto picks exact when it fits hessian_dense_mb",
    )
    hessian_dtype: str = SPECTRUM("float32", Options(("float32", "float64")), "Precision of the spectrum computation")
    hessian_dense_mb: int = SPECTRUM(
        1024,
        Interval(int, 1, 10_000_000),
        "Memory budget of the exact path (24*D^2 bytes) or gram-lanczos's A (N*K*D values)",
        unit="MiB",
    )
    hessian_tol: float = SPECTRUM(
        1e-3,
        Interval(float, 0, 1, closed="right"),
        "Lanczos restarts until every top-k residual ||Hv - lambda v||/|lambda_1| is at most this",
    )
    hessian_max_iterations: int = SPECTRUM(
        160, Interval(int, _ITERS, 100_000), "Cap on Lanczos iterations over restarts (doubling)"
    )
    spectrum_every: int = SPECTRUM(
        0, Interval(int, 0, 100_000), "Also measure the spectrum every N epochs (0: only at the end)"
    )
    geometry: bool = SPECTRUM(True, Flag(), "Penultimate-feature geometry table (Appendix B)")
    # --- detection; list fields are strings so a sweep axis never splits them: use "|" there ----
    detect: bool | None = DETECTION(
        None,
        Flag(),
        "Trigger-agnostic statistics from the spectrum: shape, localisation, flip concentration, per-class "
        "curvature (cheap; needs hessian)",
        derived="on exactly when hessian is",
    )
    detect_baselines: str = DETECTION(
        "",
        Subset(_registry("detection.baselines", "BASELINES")),
        "Baseline detectors run after training (nc: Neural Cleanse, ss: Spectral Signatures, ac: Activation "
        "Clustering, mmbd: MM-BD; plugins may add more); empty: none",
    )
    detect_windows: str = DETECTION(
        "2,3,4", NumberList(Interval(int, 1, SIDE)), "Side lengths of the w x w localisation windows", unit="px"
    )
    detect_norms: str = DETECTION(
        "0.5",
        NumberList(Interval(float, 0, None, closed="neither")),
        "Eigenvector perturbation norms, relative to the normalized held-out images' mean L2 norm",
    )
    detect_samples: int = DETECTION(
        100, Interval(int, 1, 10_000_000), "Held-out clean test images for flip concentration and Neural Cleanse"
    )
    detect_trace_samples: int = DETECTION(
        1000, Interval(int, 1, 10_000_000), "Spectrum samples (seeded subset) in the trace estimate of H"
    )
    detect_probes: int = DETECTION(
        1, Interval(int, 1, 1000), "Trace-estimate passes, one random probe per sample each (5% mean error on digits)"
    )
    nc_steps: int = DETECTION(
        300, Interval(int, 1, 100_000), "Adam steps of Neural Cleanse's mask + pattern optimisation"
    )
    nc_batch_size: int = DETECTION(
        32, Interval(int, 1, 100_000), "Clean held-out images per class per Neural Cleanse step"
    )
    mmbd_steps: int = DETECTION(300, Interval(int, 1, 100_000), "MM-BD: gradient-ascent steps per class")
    mmbd_starts: int = DETECTION(8, Interval(int, 1, 10_000), "MM-BD: random starting images per class")
    # fields declared by plugins' registrations (fields.EXTRA_FIELDS): name -> value, flat in to_dict
    extra: dict[str, Any] = dataclasses.field(
        default_factory=dict, repr=False, hash=False
    )  # a dict: hashed by the rest

    def __post_init__(self) -> None:
        load_plugins()  # registrations from SWEEPER_PLUGINS and entry points, before the registries are read
        validate(self, _derived_default)
        _validate_extra(self)
        _validate_attack(self)

    # ------------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the dataset's images."""
        return DATASETS[self.dataset].shape

    @property
    def spectrum_split(self) -> str:
        """The data the spectrum averages: ``hessian_split`` with auto resolved (clean-train under stochastic
        poisoning; under deterministic, the poisoned training set as trained on: training-set access)."""
        return spectrum_split(self.hessian_split, self.poison_mode)

    @property
    def total_epochs(self) -> int:
        """Epochs the trial trains in all: ``epochs``, twice under a filtering defence (train, then retrain)."""
        return total_epochs(self.epochs, self.defence_filter)

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset."""
        return DATASETS[self.dataset].classes


def total_epochs(epochs: int, defence_filter: str = "none") -> int:
    """The rule of :attr:`TrialConfig.total_epochs`, for a record's fields too: a filtering defence trains
    ``epochs``, filters, and retrains ``epochs`` more."""
    return int(epochs) * (1 if defence_filter == "none" else 2)


def spectrum_split(hessian_split: str, poison_mode: str) -> str:
    """The rule of :attr:`TrialConfig.spectrum_split`, for a record's fields too: ``auto`` is clean-train
    under stochastic poisoning, the poisoned training set as trained under deterministic."""
    if hessian_split != "auto":
        return hessian_split
    return "clean-train" if poison_mode == "stochastic" else "poisoned-train"


RESERVED.update(f.name for f in dataclasses.fields(TrialConfig))  # a plugin field may not take one of these


def threat_fields() -> tuple[str, ...]:
    """The attacker's choices: the fields declared in the ``attack`` group (a plugin trigger's parameters too).

    A defence search holds them fixed or lists them, never searches them; a frontier is drawn per threat.
    """
    return tuple(name for name, d in specs(TrialConfig).items() if d.spec.group == "attack")


def _validate_attack(cfg: TrialConfig) -> None:
    """A clean-label trigger poisons target-class images without relabelling: it has no all-to-all form and
    no cover samples."""
    from trainables.attack.triggers import TRIGGERS

    entry = TRIGGERS.get(cfg.trigger)
    if cfg.target_mode == "all-to-all" and entry is not None and entry.clean_label:
        fail("target_mode", cfg.target_mode, f"must be all-to-one with the clean-label trigger {cfg.trigger}")
    if cfg.cover_fraction > 0 and entry is not None and entry.clean_label:
        fail("cover_fraction", cfg.cover_fraction, f"must be 0 with the clean-label trigger {cfg.trigger}")
    if cfg.defence_filter != "none" and cfg.poison_mode != "deterministic":  # nothing fixed to find and remove
        fail(
            "defence_filter",
            cfg.defence_filter,
            "must be none under stochastic poisoning (the poisons are redrawn "
            "every epoch); valid with poison_mode=deterministic",
        )


def _validate_extra(cfg: TrialConfig) -> None:
    extra = cfg.extra
    if not isinstance(extra, dict):
        fail("extra", extra, "must be a mapping of plugin-declared fields")
    unknown = sorted(set(extra) - set(EXTRA_FIELDS))
    if unknown:
        fail("extra", extra, f"unknown plugin field(s) {unknown}; declared: {sorted(EXTRA_FIELDS) or 'none'}")
    out = {}
    for name, e in EXTRA_FIELDS.items():
        out[name] = e.spec.check.check(name, extra.get(name, e.default), cfg)
    object.__setattr__(cfg, "extra", out)


def _derived_default(cfg: TrialConfig, key: str) -> Any:
    small = cfg.image_shape[1] < 16
    if key == "lr":
        from trainables.networks.models import model_entry

        return model_entry(cfg.model).lr  # the model registry's default
    if key in ("trigger_size", "trigger_margin"):
        from trainables.attack.triggers import TRIGGERS

        size, margin = TRIGGERS[cfg.trigger].size_margin(small)  # the trigger registry's default geometry
        return size if key == "trigger_size" else margin
    if key == "sig_frequency":  # 6 periods alias on 8 columns (above Nyquist): 2 there
        # only the sig trigger reads it: unset for the others, so their trial keys stay as they were
        return (2 if small else 6) if cfg.trigger == "sig" else None
    if key == "batch_size":  # the paper's 128; digits' 1437 images take 32 for enough steps per epoch
        return 32 if cfg.dataset == "digits" else 128
    if key == "crop_padding":
        return 1 if small else 4
    if key == "detect":  # the statistics are read off the spectrum: on exactly when there is one
        return cfg.hessian
    raise KeyError(key)
