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

from collections.abc import Callable
from typing import TYPE_CHECKING

from trainables.plugins import load_plugins

if TYPE_CHECKING:  # torch loads with the first penalty computed: the registry's names are cheap to read
    import torch
    from torch import nn


def input_grad_sq(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ce, sum_batch ||d/dx_i mean CE||^2)`` with the graph kept, so the penalty can be differentiated."""
    import torch
    import torch.nn.functional as F

    x = x.detach().requires_grad_(True)
    ce = F.cross_entropy(model(x), y)
    (gx,) = torch.autograd.grad(ce, x, create_graph=True)
    return ce, gx.pow(2).sum()


def _listing1(model, x, y, kappa):
    """kappa*sum_batch||grad_x mean CE||^2 (the paper's code)"""
    ce, sq = input_grad_sq(model, x, y)
    return ce, kappa * sq  # kappa * sum_i ||grad_x mean CE||^2, exactly the paper's code


def _eq25(model, x, y, kappa):
    """kappa/2*mean_i||grad_x l_i||^2 (eq. 25)"""
    ce, sq = input_grad_sq(model, x, y)
    return ce, 0.5 * kappa * x.shape[0] * sq  # (kappa / 2) mean_i ||grad_x l_i||^2 = (kappa B / 2) * sq


# name -> (model, x, y, kappa) -> (ce, penalty), both differentiable; the config, the CLI and sweeps read it
# (the CLI's --penalty help shows each function's one-line docstring)
PENALTIES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {"listing1": _listing1, "eq25": _eq25}


def register_penalty(name: str, fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Add a penalty convention: ``fn(model, x, y, kappa) -> (ce, penalty)``."""
    PENALTIES[name] = fn


def penalized_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, kappa: float, convention: str = "listing1"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(objective, ce, penalty)`` for one batch; ``objective = ce + penalty``.

    With kappa == 0 the penalty is not computed (a plain step, no double backward). An unknown
    ``convention`` is an error (it never silently falls back to another scale).
    """
    if convention not in PENALTIES:
        load_plugins()  # penalties registered by SWEEPER_PLUGINS / entry points
    if convention not in PENALTIES:
        raise ValueError(f"penalty={convention!r} is invalid: must be one of {', '.join(PENALTIES)}")
    if kappa == 0:
        import torch
        import torch.nn.functional as F

        ce = F.cross_entropy(model(x), y)
        return ce, ce, torch.zeros((), device=x.device, dtype=ce.dtype)
    ce, penalty = PENALTIES[convention](model, x, y, kappa)
    return ce + penalty, ce, penalty


def per_sample_input_grad_sq(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||grad_x l_i||^2`` for every sample, in one backward of the summed loss.

    Exact per sample because, in eval mode, sample i's loss depends on x_i alone.
    """
    import torch
    import torch.nn.functional as F

    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    (gx,) = torch.autograd.grad(loss, x)
    return gx.pow(2).flatten(1).sum(dim=1)
