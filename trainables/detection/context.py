"""What screening a trained model for a backdoor takes and gives, shared by the cheap detectors
(:mod:`trainables.detection.statistics`) and the baselines (:mod:`trainables.detection.baselines`).

* :class:`DetectionSettings`: the detection fields of a config, parsed once.
* :class:`DetectionContext`: the typed values a detector reads (the model, the settings, the
  spectrum, clean held-out images, the training set as trained). It is built from a finished trial by
  :meth:`trainables.training.train.Trial.detection_context`, the one place that knows the trial; detectors
  and baselines only read it.
* :class:`DetectorEntry`: one registered detector or baseline: its function, what a defender must
  hold to run it (:data:`ACCESS`) and what it costs (``sweeper plan``).
* :class:`Detection`: what one of them found.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from trainables.fields import split_list
from trainables.networks.batching import forward_chunk
from trainables.spectrum.spectra import GroupSpectra

if TYPE_CHECKING:  # torch loads at the first computation: the CLI reads these registries without it
    import torch
    from torch import nn

ACCESS: tuple[str, ...] = ("data-free", "spectrum-samples", "clean-data", "training-set", "oracle")
"""What a defender must hold to run a detector; a :class:`DetectorEntry` names every level it needs.

* ``data-free``: the trained model only, white-box (forward and backward passes, penultimate features).
* ``spectrum-samples``: the labelled samples the input-Hessian spectrum averaged over; whatever reads
  the spectrum (eigenpairs, trace, per-class spectra) needs them. Which data that is depends on the
  config (``hessian_split``): clean training images (``clean-train``, and ``auto`` under stochastic
  poisoning), the training set as trained (``poisoned-train``, and ``auto`` under deterministic
  poisoning) or clean test images (``test``); :func:`resolve_access` says which of the two levels
  below it is for a given config.
* ``clean-data``: a few clean labelled images (no trigger); the context's are a seeded subset of the test
  split, never trained on.
* ``training-set``: the training set as trained on, triggered samples and their labels included,
  without knowing which samples are poisoned.
* ``oracle``: the attack's trigger (no defender holds it; for evaluation-only detectors).

A detector's *level* is the highest of what it needs (:data:`LEVELS`, :func:`access_level`): the level
its numbers are reported at and compared within (the field's protocol: NC and MM-BD are ``clean-data``
or ``data-free``, Spectral Signatures and Activation Clustering ``training-set``).

Evaluation-only metrics (per-sample AUROC against the poison mask, a class eigenvector's overlap with
the trigger) read the attack's ground truth, which every context carries
(:attr:`DetectionContext.trigger_direction`, :attr:`TrainingSet.poison`, the target): they are no
scores and need no level.
"""


@dataclass
class Detection:
    """What one detector or baseline found: scalar metrics, JSON-able details, images to log."""

    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (n, C|1, H, W) stack


@dataclass(frozen=True)
class DetectionSettings:
    """The detection fields of a :class:`~trainables.config.TrialConfig`, parsed once (lists as tuples)."""

    detect: bool  # the statistics run: ``detect`` asked for them and ``hessian`` computes their spectrum
    baselines: tuple[str, ...]  # the baselines to run, in the config's order
    windows: tuple[int, ...]  # localisation window sides, px
    norms: tuple[float, ...]  # flip perturbation norms, relative to the held-out images' mean norm
    samples: int  # held-out clean images (flip concentration, Neural Cleanse)
    trace_samples: int  # spectrum samples in a trace estimate
    probes: int  # trace-estimate passes
    nc_steps: int
    nc_batch_size: int
    mmbd_steps: int
    mmbd_starts: int
    top_k: int  # eigenpairs of the spectrum
    num_classes: int
    image_shape: tuple[int, int, int]
    target: int | None  # the attack's target class, None under all-to-all: evaluation only (AUROC within it,
    # the oracle overlap)
    seed: int
    batch_size: int  # evaluation batch size
    model: str  # the model's name, for messages
    spectrum_split: str  # the spectrum's samples: clean-train, poisoned-train or test ("auto" resolved)
    spectrum_dtype: str  # float32 or float64
    dense_mb: float  # the memory budget of dense matrices (``hessian_dense_mb``), MiB
    params: dict[str, Any] = field(default_factory=dict)  # the fields plugins declared (a detector's own)

    @classmethod
    def from_config(cls, cfg: Any) -> DetectionSettings:
        """The settings of a validated network config."""
        split = cfg.spectrum_split  # the config states the rule once
        return cls(
            detect=bool(cfg.detect and cfg.hessian),
            baselines=tuple(split_list(cfg.detect_baselines)),
            windows=tuple(int(w) for w in split_list(cfg.detect_windows)),
            norms=tuple(float(r) for r in split_list(cfg.detect_norms)),
            samples=cfg.detect_samples,
            trace_samples=cfg.detect_trace_samples,
            probes=cfg.detect_probes,
            nc_steps=cfg.nc_steps,
            nc_batch_size=cfg.nc_batch_size,
            mmbd_steps=cfg.mmbd_steps,
            mmbd_starts=cfg.mmbd_starts,
            top_k=cfg.hessian_top_k,
            num_classes=cfg.num_classes,
            image_shape=tuple(cfg.image_shape),
            target=cfg.target if cfg.target_mode == "all-to-one" else None,  # all-to-all has no target
            seed=cfg.seed,
            batch_size=cfg.eval_batch_size,
            model=cfg.model,
            spectrum_split=split,
            spectrum_dtype=cfg.hessian_dtype,
            dense_mb=cfg.hessian_dense_mb,
            params=dict(getattr(cfg, "extra", {})),
        )


LEVELS: tuple[str, ...] = ("data-free", "clean-data", "training-set", "oracle")  # from least to most held


def access_level(access: Iterable[str], split: DetectionSettings | str) -> str:
    """The level a detector needing ``access`` is reported at when the spectrum averaged ``split``
    (a resolved ``hessian_split``, or the settings that carry it): the most it holds."""
    return max(resolve_access(access, split), key=LEVELS.index)


def resolve_access(access: Iterable[str], split: DetectionSettings | str) -> tuple[str, ...]:
    """``access`` with ``spectrum-samples`` replaced by the level of the spectrum's data ``split`` (a
    resolved ``hessian_split``, or the settings that carry it): ``training-set`` for the poisoned training
    set as trained, ``clean-data`` otherwise."""
    split = getattr(split, "spectrum_split", split)
    held = "training-set" if split == "poisoned-train" else "clean-data"
    return tuple(dict.fromkeys(held if a == "spectrum-samples" else a for a in access))


def seeded(seed: int, offset: int) -> torch.Generator:
    """A CPU generator seeded by a trial's seed and a per-use offset (each use draws its own stream)."""
    import torch

    return torch.Generator().manual_seed(seed * 1000 + offset)


@dataclass(frozen=True)
class DetectionSpectrum:
    """The trial's input-Hessian spectrum as detection reads it: H = mean_i Hess_x CE(f(x_i), y_i)."""

    eigenvalues: tuple[float, ...]  # top-k, largest first (NaN where the path found fewer)
    eigenvectors: torch.Tensor  # (k, C, H, W), normalized input space; zero rows pad a rank-limited spectrum
    x: torch.Tensor  # (n, C, H, W) the normalized samples H averages over (``spectrum_split``'s)
    y: torch.Tensor  # (n,) their labels
    trace: float | None = None  # tr(H) when the path knows it exactly (||A||_F^2), else None
    classes: GroupSpectra | None = None  # per-class spectra from the exact path's own pass, else None


@dataclass(frozen=True)
class TrainingSet:
    """The training set as the model was (last) trained on it."""

    x: torch.Tensor  # (N, C, H, W) normalized, the trigger applied where poisoned
    y: torch.Tensor  # (N,) labels as trained (the target where poisoned)
    poison: torch.Tensor | None  # (N,) bool, the poisoned samples: evaluation only (per-sample AUROC), never a
    # score; None where it is hidden (a filtering defence's scorers)


@dataclass(frozen=True)
class DetectionContext:
    """The inputs a detector or baseline may read, as typed values.

    Built by :meth:`trainables.training.train.Trial.detection_context`, which fills ``spectrum``, ``heldout`` and
    ``training`` only when an entry to run declares the access level they serve (``spectrum-samples``,
    ``clean-data``, ``training-set``; see :data:`ACCESS`); otherwise they are None.
    """

    model: nn.Module
    settings: DetectionSettings
    mean: torch.Tensor  # (C,) per-channel normalization of raw images in [0, 1]
    std: torch.Tensor  # (C,)
    device: torch.device
    spectrum: DetectionSpectrum | None = None
    heldout: tuple[torch.Tensor, torch.Tensor] | None = None  # (raw clean test images in [0, 1], labels)
    training: TrainingSet | None = None
    trigger_direction: torch.Tensor | None = None  # (C, H, W) unit: evaluation only (an oracle overlap)

    def generator(self, offset: int) -> torch.Generator:
        """A CPU generator seeded by the trial's seed and a per-use offset."""
        return seeded(self.settings.seed, offset)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw images in [0, 1] -> the model's input (per-channel standardization)."""
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    @cached_property
    def train_features(self) -> torch.Tensor:
        """Penultimate features of :attr:`training`, float64 on the CPU (computed once)."""
        from trainables.spectrum.geometry import features

        if self.training is None:
            raise ValueError("no training set in this detection context: declare access 'training-set'")
        return features(self.model, self.training.x, self.settings.batch_size).double().cpu()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes of normalized images, in eval mode, batched."""
        import torch

        with torch.no_grad():  # not a decorator: torch loads at the first call, not at import
            self.model.eval()
            b = forward_chunk(self.settings.batch_size, x.device)
            return torch.cat([self.model(x[s : s + b]).argmax(1) for s in range(0, len(x), b)])


Cost = Callable[[DetectionSettings, float, int, int], float]


@dataclass(frozen=True)
class DetectorEntry:
    """A detector (:data:`trainables.detection.statistics.DETECTORS`) or a baseline (:data:`trainables.detection.baselines.BASELINES`).

    ``fn(ctx)`` returns a :class:`Detection` from a :class:`DetectionContext`. ``access`` names every
    level of :data:`ACCESS` a defender must hold to run it (the context is built with what the entries
    to run declare). ``cost(settings, per_sample_seconds, n_spectrum_samples, train_size)`` is its rough
    CPU seconds for ``sweeper plan``: ``per_sample_seconds`` is the model's forward-backward time of one
    sample, ``n_spectrum_samples`` the spectrum's samples, ``train_size`` the training images.
    ``scores`` names the metrics it reports that are scores and which way is suspicious
    (``{"det_toy": "higher"}``; a key is a regular expression a metric's whole name must match, so a family
    such as ``det_window_frac_w\\d+`` is one key): ``sweeper detect`` scores exactly those over a
    population, each at this entry's access level (:func:`access_level`).
    ``params`` declares its own settings, each with :func:`trainables.fields.field`: they become fields
    of every network trial (``sweeper trial --NAME``, ``--set``, records) and reach it as
    ``ctx.settings.params[NAME]``.
    """

    name: str
    fn: Callable[[DetectionContext], Detection]
    access: tuple[str, ...]
    cost: Cost
    scores: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def scores_metric(self, name: str) -> bool:
        """Whether metric ``name`` is one of this entry's scores."""
        return any(re.fullmatch(pattern, name) for pattern in self.scores)

    def __post_init__(self) -> None:
        for pattern in self.scores:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"detector {self.name!r}: score {pattern!r} is no regular expression ({e})") from e
        if isinstance(self.access, str) or not self.access or any(a not in ACCESS for a in self.access):
            raise ValueError(
                f"detector {self.name!r}: access must be a tuple of {', '.join(ACCESS)}; got {self.access!r}"
            )
