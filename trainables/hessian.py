"""The input-space Hessian as an operator, Lanczos on it, and the trigger overlap (App. E.2).

``InputHessian`` applies H = (1/N) sum_i d^2/dx_i^2 CE(f(x_i), y_i) to a vector shared by all
samples (Listing 5), chunk by chunk, with the model in eval mode. It has ``shape``, ``dtype``,
``device`` and ``@`` so any eigensolver - or a dense comparison in a test - can use it.

Two exact products:
  * ``double-backward`` (Listing 5): grad of <grad_x L, v> with respect to x. Any network.
  * ``gauss-newton``: J^T S J v with S = diag(p) - p p^T the CE Hessian in the logits, J v from a
    forward-mode tangent and J^T from one backward. For piecewise-linear networks (ReLU, max-pool,
    eval BatchNorm) the logits have zero second derivative almost everywhere, so this *is* the
    input Hessian, at about half the cost. For GELU and other smooth activations it is not.

``top_eigenpairs`` runs linear_operator's ``lanczos_tridiag`` (full reorthogonalisation) on the
operator divided by a Hutchinson estimate of its Frobenius norm: the routine stops once every
|beta| < 1e-6 in absolute terms, which on an unscaled operator with lambda_1 ~ 1e-5 (random-init or
strongly penalised nets) ends after a few iterations with a wrong spectrum. The tridiagonal matrix
is diagonalised with ``torch.linalg.eigh`` (``lanczos_tridiag_to_diag`` would replace negative
Ritz values by 1; the input Hessian is indefinite).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from linear_operator.utils.lanczos import lanczos_tridiag
from torch import nn


class InputHessian:
    """H = mean_i Hess_x CE(model(x_i), y_i), as a matrix-free symmetric operator on R^D, D = C*H*W."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk_size: int = 1000,
                 method: str = "double-backward", dtype: torch.dtype = torch.float32):
        if method not in ("double-backward", "gauss-newton"):
            raise ValueError(f"method={method!r} is invalid: must be double-backward or gauss-newton")
        # a private eval-mode copy in the requested precision: the trained model is left untouched
        self.model = copy.deepcopy(model).to(dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.x = x.to(dtype)
        self.y = y
        self.chunk_size = chunk_size
        self.method = method
        self.item_shape = tuple(x.shape[1:])
        d = int(torch.tensor(self.item_shape).prod())
        self.shape = (d, d)
        self.dtype = dtype
        self.device = x.device
        self.products = 0  # Hessian-vector products applied (for cost accounting)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        if v.dim() == 1:
            return self._hvp(v)
        return torch.stack([self._hvp(v[:, j]) for j in range(v.shape[1])], dim=1)

    def _hvp(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        v = v.to(self.dtype).reshape(1, *self.item_shape)
        out = torch.zeros(self.item_shape, dtype=self.dtype, device=self.device)
        for s in range(0, len(self.y), self.chunk_size):
            xc, yc = self.x[s:s + self.chunk_size], self.y[s:s + self.chunk_size]
            prod = self._chunk_double_backward if self.method == "double-backward" else self._chunk_gauss_newton
            out += prod(xc, yc, v)
        return (out / len(self.y)).reshape(-1)

    def _chunk_double_backward(self, xc, yc, v):
        xc = xc.detach().requires_grad_(True)
        with torch.enable_grad():
            # summed loss: in eval mode sample i's loss depends on x_i alone, so its gradient
            # with respect to the chunk holds every per-sample gradient at once
            loss = F.cross_entropy(self.model(xc), yc, reduction="sum")
            (g,) = torch.autograd.grad(loss, xc, create_graph=True)
            (hv,) = torch.autograd.grad((g * v).sum(), xc)
        return hv.sum(dim=0)

    def _chunk_gauss_newton(self, xc, yc, v):
        xc = xc.detach().requires_grad_(True)
        with torch.enable_grad(), fwAD.dual_level():
            out = self.model(fwAD.make_dual(xc, v.expand_as(xc)))
            logits, jv = fwAD.unpack_dual(out)  # jv = J_i v for every sample
            p = logits.detach().softmax(dim=1)
            s_jv = p * jv - p * (p * jv).sum(dim=1, keepdim=True)  # (diag p - p p^T) J v
            (hv,) = torch.autograd.grad((logits * s_jv.detach()).sum(), xc)  # J^T S J v
        return hv.sum(dim=0)

    def dense(self) -> torch.Tensor:
        """The full D x D matrix, one product per column (tests and tiny inputs only)."""
        eye = torch.eye(self.shape[0], dtype=self.dtype, device=self.device)
        return torch.stack([self._hvp(eye[:, j]) for j in range(self.shape[0])], dim=1)


@dataclass
class Spectrum:
    """Top-k eigenpairs of an operator, largest algebraic first."""

    eigenvalues: torch.Tensor  # (k,)
    eigenvectors: torch.Tensor  # (D, k), orthonormal columns
    iterations: int  # Lanczos iterations actually run
    scale: float  # the norm estimate the operator was divided by


def frobenius_estimate(op, probes: int, generator: torch.Generator) -> float:
    """Hutchinson: E||H z||^2 = ||H||_F^2 for z ~ N(0, I); ||H||_F lies in [|lambda|_max, sqrt(rank) |lambda|_max]."""
    d = op.shape[0]
    z = torch.randn(d, probes, generator=generator, dtype=torch.float64).to(device=op.device, dtype=op.dtype)
    return float(((op @ z).pow(2).sum(0).mean()).sqrt())


def top_eigenpairs(op, k: int = 5, iterations: int = 20, seed: int = 0, probes: int = 2,
                   on_iteration: Callable[[int], None] | None = None) -> Spectrum:
    """Largest-algebraic top-k eigenpairs of a symmetric operator by scaled Lanczos.

    ``op`` needs ``shape``, ``dtype``, ``device`` and ``@`` (dense tensors qualify). The start
    vector is drawn from ``seed``; the global RNG is not touched.
    """
    d = op.shape[0]
    g = torch.Generator().manual_seed(seed)
    scale = frobenius_estimate(op, probes, g) if probes else 1.0
    if not scale > 0:  # H = 0: every direction is an eigenvector with eigenvalue 0
        return Spectrum(torch.zeros(k, dtype=op.dtype), torch.eye(d, k, dtype=op.dtype, device=op.device), 0, 0.0)
    init = torch.randn(d, 1, generator=g, dtype=torch.float64).to(device=op.device, dtype=op.dtype)
    count = [0]

    def closure(v):
        count[0] += 1
        if on_iteration is not None:
            on_iteration(count[0])
        return (op @ v) / scale

    q, t = lanczos_tridiag(closure, max_iter=min(iterations, d), dtype=op.dtype, device=op.device,
                           matrix_shape=(d, d), init_vecs=init)
    evals, evecs = torch.linalg.eigh(t)
    order = torch.argsort(evals, descending=True)[:k]
    values = evals[order] * scale
    vectors = q @ evecs[:, order]
    if len(values) < k:  # invariant subspace smaller than k (e.g. a linear model's rank-limited H)
        pad = k - len(values)
        values = torch.cat([values, torch.full((pad,), float("nan"), dtype=values.dtype, device=values.device)])
        vectors = torch.cat([vectors, torch.zeros(d, pad, dtype=vectors.dtype, device=vectors.device)], dim=1)
    return Spectrum(values, vectors, q.shape[-1], scale)


def listing7_overlap(eigvec: torch.Tensor, direction: torch.Tensor) -> float:
    """Listing 7: cosine of the zero-mean, normalized eigenvector with the zero-mean, normalized trigger."""
    v = eigvec.reshape(-1).to(torch.float64)
    v = v - v.mean()
    v = v / (v.norm() + 1e-8)
    m = direction.reshape(-1).to(torch.float64).to(v.device)
    m = m - m.mean()
    m = m / (m.norm() + 1e-8)
    return float((v * m).sum())


def spectrum_metrics(spec: Spectrum, direction: torch.Tensor) -> tuple[dict[str, float], torch.Tensor, list[float]]:
    """lambda_1..k, eig_gap, overlap (v1), overlap_sq, max_overlap_sq and its index (Table 2).

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
    return metrics, vecs, overlaps
