"""The training recipe's pure pieces, outside the loop: the learning-rate schedule and augmentation.

``lr_at`` is the step schedule (x ``lr_decay`` at each of ``lr_drops`` equal spans; the paper's
x0.1 every epochs/3). ``augment_batch`` is Listing 3's random crop and horizontal flip on a whole
batch on the device, with no per-sample Python; :class:`trainables.training.train.Trial` applies the trigger
after it.
"""

from __future__ import annotations

import torch

from trainables.config import TrialConfig


def lr_at(cfg: TrialConfig, epoch: int) -> float:
    """Step schedule: ``lr * lr_decay**k`` in the k-th of ``lr_drops + 1`` equal spans of the run."""
    k = min(cfg.lr_drops, (epoch * (cfg.lr_drops + 1)) // cfg.epochs)
    return cfg.lr * cfg.lr_decay**k


def augment_batch(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip of a whole batch, no per-sample Python."""
    b, _, h, w = x.shape
    offs = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    if padding:
        padded = torch.nn.functional.pad(x, (padding,) * 4)
        rows = offs[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
        cols = offs[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
        bidx = torch.arange(b, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
