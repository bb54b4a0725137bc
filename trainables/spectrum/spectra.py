"""What a spectrum computation returns and the metrics read from it (App. E.2, Listing 7, Table 2).

``Spectrum`` (top-k eigenpairs with how they were computed) and ``GroupSpectra`` (the top pair and
trace per group of samples) are the results every path returns (:mod:`trainables.spectrum.lanczos`,
:mod:`trainables.spectrum.exact_hessian`, :mod:`trainables.spectrum.hessian`). ``spectrum_metrics`` turns a spectrum
and the trigger direction into the trial's metrics: eigenvalues, Listing 7's overlaps, Table 2's
max overlap and its index, residuals and the shape of the whole spectrum (``spectrum_summary``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads at the first computation: the CLI reads these registries without it
    import torch


@dataclass
class Spectrum:
    """Top-k eigenpairs of an operator, largest algebraic first."""

    eigenvalues: torch.Tensor  # (k,)
    eigenvectors: torch.Tensor  # (D, k), orthonormal columns
    iterations: int  # Lanczos iterations actually run (0: a dense decomposition)
    scale: float  # the norm estimate the operator was divided by
    residuals: torch.Tensor | None = None  # (k,) ||H v_j - lambda_j v_j|| / |lambda_1|; None: not measured
    converged: bool | None = None  # every finite residual <= the tolerance (always true for exact)
    all_eigenvalues: torch.Tensor | None = None  # the whole spectrum, descending (exact path only)
    trace: float | None = None  # tr H = ||A||_F^2 / N, when known without the whole spectrum
    method: str = ""  # the path that computed it (exact, gram-lanczos, double-backward, gauss-newton)
    reason: str = ""  # why that path was used
    groups: GroupSpectra | None = None  # per-group spectra, when asked for and the exact Gram path ran


@dataclass
class GroupSpectra:
    """Exact top eigenpair and trace of the input Hessian averaged over each group of samples."""

    lambda_1: torch.Tensor  # (G,) float64, NaN for a group with no sample
    trace: torch.Tensor  # (G,) tr H_g = ||A_g||_F^2 / n_g
    count: torch.Tensor  # (G,) samples per group
    vectors: torch.Tensor  # (G, D) top eigenvector of each H_g (zeros for an empty group)


def spectrum_summary(all_eigenvalues: torch.Tensor | None, k: int, trace: float | None = None) -> dict[str, float]:
    """hessian_trace, effective_rank and top_k_trace_fraction of a (PSD) spectrum.

    effective_rank = exp(entropy of lambda_j / sum lambda) over the positive part (Roy & Vetterli
    2007): D for a flat spectrum, 1 for rank one. Roundoff-negative eigenvalues count as 0.
    """
    import torch

    out: dict[str, float] = {}
    if all_eigenvalues is not None:
        lam = all_eigenvalues.to(torch.float64).clamp(min=0)
        total = float(lam.sum())
        out["hessian_trace"] = total
        if total > 0:
            q = lam[lam > 0] / total
            out["effective_rank"] = float(torch.exp(-(q * q.log()).sum()))
            out["top_k_trace_fraction"] = float(lam[:k].sum()) / total
        else:
            out["effective_rank"] = out["top_k_trace_fraction"] = math.nan
    elif trace is not None:
        out["hessian_trace"] = trace
    return out


def listing7_overlap(eigvec: torch.Tensor, direction: torch.Tensor) -> float:
    """Listing 7: cosine of the zero-mean, normalized eigenvector with the zero-mean, normalized trigger."""
    import torch

    v = eigvec.reshape(-1).to(torch.float64)
    v = v - v.mean()
    v = v / (v.norm() + 1e-8)
    m = direction.reshape(-1).to(torch.float64).to(v.device)
    m = m - m.mean()
    m = m / (m.norm() + 1e-8)
    return float((v * m).sum())


def spectrum_metrics(spec: Spectrum, direction: torch.Tensor) -> tuple[dict[str, float], torch.Tensor, list[float]]:
    """lambda_1..k, eig_gap, overlap (v1), overlap_sq, max_overlap_sq and its index (Table 2).

    Plus, when the spectrum carries them: ``ritz_residual_1..k`` / ``ritz_residual_max`` and
    ``spectrum_converged`` (0/1), ``hessian_exact`` (1 on the exact path), and the
    :func:`spectrum_summary` (hessian_trace; effective_rank and top_k_trace_fraction when exact).

    Eigenvector signs are arbitrary; each is flipped so that its overlap is >= 0, so ``overlap``
    is Listing 7's value up to that sign. Returns the metrics, the sign-fixed eigenvectors and
    every eigenvector's overlap.
    """
    k = spec.eigenvalues.shape[0]
    vecs = spec.eigenvectors.clone()
    overlaps = []
    for j in range(k):
        o = listing7_overlap(vecs[:, j], direction)
        if o < 0:
            vecs[:, j] = -vecs[:, j]
            o = -o
        overlaps.append(o)
    metrics = {f"lambda_{j + 1}": float(spec.eigenvalues[j]) for j in range(k)}
    metrics["eig_gap"] = float(spec.eigenvalues[0] - spec.eigenvalues[1]) if k > 1 else float("nan")
    metrics["overlap"] = overlaps[0]
    metrics["overlap_sq"] = overlaps[0] ** 2
    sq = [o * o for o in overlaps]
    best = max(range(k), key=lambda j: sq[j])
    metrics["max_overlap_sq"] = sq[best]
    metrics["max_overlap_index"] = best  # 0-based, as in the paper's Table 2
    metrics["lanczos_iterations"] = spec.iterations
    if spec.residuals is not None:
        res = [float(r) for r in spec.residuals]
        metrics.update({f"ritz_residual_{j + 1}": r for j, r in enumerate(res)})
        finite = [r for r in res if math.isfinite(r)]
        metrics["ritz_residual_max"] = max(finite) if finite else math.nan
        metrics["spectrum_converged"] = float(bool(spec.converged))
    if spec.method:
        metrics["hessian_exact"] = float(spec.method == "exact")
    metrics.update(spectrum_summary(spec.all_eigenvalues, k, spec.trace))
    return metrics, vecs, overlaps
