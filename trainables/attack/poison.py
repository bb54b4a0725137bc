"""Which training samples carry the trigger, as a boolean mask over the training set.

Only samples whose label differs from the target can be poisoned, and a poisoned sample
takes the target label (dirty-label backdoor). Two modes, after the paper's threat models:

* ``deterministic`` (Listing 3): sample *i* is poisoned iff ``u_i < theta`` where ``u_i`` is a
  per-index uniform draw that depends only on (seed, i). Listing 3 seeds one RandomState per
  index; we use a counter-based Philox stream keyed by the trial seed, whose *i*-th output is
  likewise a function of (seed, i) alone, computed for all indices at once. Fixed across epochs.
* ``stochastic`` (Listing 4): every sample is re-drawn every epoch from a generator whose
  state is part of the trial's checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch


def deterministic_uniforms(n: int, seed: int) -> np.ndarray:
    """``u_i`` for i < n; ``u_i`` depends only on (seed, i), not on n."""
    return np.random.Generator(np.random.Philox(key=seed + 42)).random(n)


class Poisoner:
    """Produces the per-epoch poison mask and the labels trained on."""

    def __init__(self, labels: torch.Tensor, theta: float, target: int, mode: str, seed: int):
        self.labels = labels
        self.theta = theta
        self.target = target
        self.mode = mode
        self.eligible = labels != target
        self.generator = torch.Generator().manual_seed(seed + 1_000_003)  # stochastic redraws
        if mode == "deterministic":
            u = torch.from_numpy(deterministic_uniforms(len(labels), seed)).to(labels.device)
            self.fixed = (u < theta) & self.eligible
        else:
            self.fixed = None

    def mask_for_epoch(self) -> torch.Tensor:
        """The (N,) bool mask of poisoned samples for the next epoch."""
        if self.fixed is not None:
            return self.fixed
        u = torch.rand(len(self.labels), generator=self.generator).to(self.labels.device)
        return (u < self.theta) & self.eligible

    def poisoned_labels(self, mask: torch.Tensor) -> torch.Tensor:
        """Labels as trained on: the target where poisoned, the true label elsewhere."""
        return torch.where(mask, torch.full_like(self.labels, self.target), self.labels)

    def state_dict(self) -> dict:
        """RNG state for checkpointing."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the RNG state saved by :meth:`state_dict`."""
        self.generator.set_state(state["generator"])
