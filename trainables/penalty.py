"""The input-gradient penalty (paper eq. 25, Listing 1) and the input-Fisher trace (eq. 34).

Scale of kappa. Listing 1, which produced the paper's numbers, adds

    kappa * sum_{i in batch} || d/dx_i  mean_j CE(f(x_j), y_j) ||^2
  = kappa / B^2 * sum_i ||grad_x l_i||^2 = (kappa / B) * mean_i ||grad_x l_i||^2,

because the gradient of a batch *mean* with respect to x_i is grad_x l_i / B. Eq. 25 instead
adds (kappa/2) * mean_i ||grad_x l_i||^2. The two agree when kappa_eq25 = 2 kappa_listing1 / B,
so a Listing-1 kappa is tied to the batch size (kappa = 1e4 at B = 128 is eq-25 kappa = 156).
``penalty="listing1"`` (the default, to reproduce the paper) and ``penalty="eq25"`` select
the convention; both are exact double-backward computations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def penalized_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kappa: float,
                   convention: str = "listing1") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(objective, ce, penalty)`` for one batch; ``objective = ce + penalty``.

    With kappa == 0 the penalty is not computed (a plain step, no double backward).
    """
    if kappa == 0:
        ce = F.cross_entropy(model(x), y)
        return ce, ce, torch.zeros((), device=x.device, dtype=ce.dtype)
    x = x.detach().requires_grad_(True)
    ce = F.cross_entropy(model(x), y)
    (gx,) = torch.autograd.grad(ce, x, create_graph=True)  # graph kept: the penalty is differentiated
    sq = gx.pow(2).sum()
    scale = kappa if convention == "listing1" else 0.5 * kappa * x.shape[0]
    penalty = scale * sq
    return ce + penalty, ce, penalty


def per_sample_input_grad_sq(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||grad_x l_i||^2`` for every sample, in one backward of the summed loss.

    Exact per sample because, in eval mode, sample i's loss depends on x_i alone.
    """
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (gx,) = torch.autograd.grad(loss, x)
    return gx.pow(2).flatten(1).sum(dim=1)
