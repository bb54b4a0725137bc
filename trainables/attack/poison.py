"""Which training samples carry the trigger, as a boolean mask over the training set.

Which samples can be poisoned, and the label a poisoned one takes, depend on the attack:

* **all-to-one** (the paper's, the default): samples whose label differs from the target; a poisoned
  sample takes the target label (dirty-label).
* **all-to-all** (``target_mode``): every sample; a poisoned sample of class y is labelled (y + 1) mod K.
* **clean-label** (a trigger declared so, e.g. SIG): the target class's own samples, labels unchanged.

theta is the fraction of the eligible samples poisoned. The **adaptive** attack of this project
(``cover``, after the cover samples of Qi et al., ICLR 2023) also puts the trigger on a fraction of the
eligible samples that are *not* poisoned, keeping their true labels: in the training set as trained the
trigger then occurs in every class, not only in the target's, which is what the per-class curvature
detector and the clustering baselines read. Cover samples are drawn per index like deterministic
poisoning (a separate stream keyed by the seed), so they are a function of the poison mask in both
modes; at theta 0 there are none (no attack, a clean model). Two modes, after the paper's threat models:

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

    def __init__(
        self,
        labels: torch.Tensor,
        theta: float,
        target: int,
        mode: str,
        seed: int,
        num_classes: int | None = None,
        target_mode: str = "all-to-one",
        clean_label: bool = False,
        cover: float = 0.0,
    ):
        self.labels = labels
        self.theta = theta
        self.target = target
        self.mode = mode
        self.target_mode = target_mode
        self.clean_label = clean_label
        self.num_classes = num_classes if num_classes is not None else int(labels.max()) + 1
        if clean_label and target_mode != "all-to-one":
            raise ValueError("a clean-label attack is all-to-one: it poisons the target class's own samples")
        if clean_label and cover > 0:
            raise ValueError("a clean-label attack has no cover samples: its poisons already keep their labels")
        self.cover = cover
        if clean_label:
            self.eligible = labels == target
        elif target_mode == "all-to-all":
            self.eligible = torch.ones_like(labels, dtype=torch.bool)
        else:
            self.eligible = labels != target
        self.generator = torch.Generator().manual_seed(seed + 1_000_003)  # stochastic redraws
        # cover samples are part of an attack: at theta 0 there is none, and the model is a clean one
        self.cover_u = (
            torch.from_numpy(deterministic_uniforms(len(labels), seed + 7_919)).to(labels.device)
            if cover > 0 and theta > 0
            else None
        )
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

    def carriers(self, mask: torch.Tensor) -> torch.Tensor:
        """The (N,) bool mask of training samples that carry the trigger in an epoch whose poison mask is
        ``mask``: the poisoned ones and, under the adaptive attack, the cover samples (eligible, not
        poisoned, ``cover`` of them; labels kept)."""
        if self.cover_u is None:
            return mask
        return mask | ((self.cover_u < self.cover) & self.eligible & ~mask)

    def poisoned_labels(self, mask: torch.Tensor) -> torch.Tensor:
        """Labels as trained on: where poisoned, the target (all-to-one), (y + 1) mod K (all-to-all) or the
        true label (clean-label); the true label elsewhere."""
        return torch.where(mask, self.attack_labels(self.labels), self.labels)

    def attack_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The label the attacker wants for a triggered image of each true label: the target, or (y + 1) mod K
        under all-to-all (also what the ASR counts)."""
        if self.target_mode == "all-to-all":
            return (labels + 1) % self.num_classes
        return torch.full_like(labels, self.target)

    def attack_set(self, labels: torch.Tensor) -> torch.Tensor:
        """Which test images the ASR counts: those of other classes than the target (all-to-one, clean-label
        too), every one under all-to-all (each has a wrong label to be sent to)."""
        if self.target_mode == "all-to-all":
            return torch.ones_like(labels, dtype=torch.bool)
        return labels != self.target

    def state_dict(self) -> dict:
        """RNG state for checkpointing."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the RNG state saved by :meth:`state_dict`."""
        self.generator.set_state(state["generator"])
