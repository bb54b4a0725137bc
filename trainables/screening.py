"""What screening a trained model for a backdoor takes and gives, shared by the cheap detectors
(:mod:`trainables.detect`) and the baselines (:mod:`trainables.baselines`): the lazily built inputs
(:class:`DetectionContext`) and one detector's findings (:class:`Detection`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn


@dataclass
class Detection:
    """What one detector or baseline found: scalar metrics, JSON-able details, images to log."""

    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (n, C|1, H, W) stack


class DetectionContext:
    """The inputs a detector may use, built lazily from a finished :class:`~trainables.train.Trial`.

    Clean held-out images are a seeded subset of the test split (never trained on); the training
    set *as trained* (triggers applied, poisoned labels) and its poison mask serve the data-level
    baselines and their per-sample AUROC.
    """

    def __init__(self, trial):
        self.trial = trial
        self.cfg = trial.cfg
        self.model: nn.Module = trial.model
        self.device = trial.device
        self.num_classes = trial.cfg.num_classes
        self.batch_size = trial.cfg.eval_batch_size
        vals = trial.artifacts.get("eigenvalues")
        self.eigenvalues: list[float] | None = list(vals) if vals is not None else None
        self.eigenvectors: torch.Tensor | None = trial.artifacts.get("eigenvectors")  # (k, C, H, W)

    def generator(self, offset: int) -> torch.Generator:
        """A CPU generator seeded by the trial's seed and a per-use offset."""
        return torch.Generator().manual_seed(self.cfg.seed * 1000 + offset)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.trial.data.normalize(x)

    @cached_property
    def heldout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw images in [0, 1], labels): at most ``detect_samples`` clean test images."""
        data = self.trial.data
        n = len(data.test_y)
        idx = torch.randperm(n, generator=self.generator(11))[: self.cfg.detect_samples].sort().values
        idx = idx.to(data.test_y.device)
        return data.test_x[idx], data.test_y[idx]

    @cached_property
    def poison_mask(self) -> torch.Tensor:
        """(N,) bool: the training samples poisoned in the data the model was (last) trained on."""
        p = self.trial.poisoner
        mask = p.fixed if p.fixed is not None else self.trial.last_mask
        return mask if mask is not None else torch.zeros_like(self.trial.data.train_y, dtype=torch.bool)

    @cached_property
    def train_as_trained(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized training images with the trigger where poisoned, labels as trained)."""
        data, mask = self.trial.data, self.poison_mask
        x = self.normalize(self.trial.trigger.apply(data.train_x, mask))
        return x, self.trial.poisoner.poisoned_labels(mask)

    @cached_property
    def train_features(self) -> torch.Tensor:
        """Penultimate features of :attr:`train_as_trained`, float64 on the CPU."""
        from .geometry import features

        return features(self.model, self.train_as_trained[0], self.batch_size).double().cpu()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted classes of normalized images, in eval mode, batched."""
        self.model.eval()
        return torch.cat([self.model(x[s : s + self.batch_size]).argmax(1) for s in range(0, len(x), self.batch_size)])


# ----------------------------------------------------------------------------- spectral shape
