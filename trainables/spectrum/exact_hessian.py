"""The exact input-Hessian path for piecewise-linear networks: per-sample factors, their Gram, spectra.

The logits of a piecewise-linear network (ReLU, max-pool, eval BatchNorm) are piecewise linear in
x, so their second derivative is zero almost everywhere and the input Hessian of sample i's CE is
exactly J_i^T S_i J_i, with J_i the K x D logit Jacobian and S_i = diag(p_i) - p_i p_i^T. With the
factor L_i = diag(sqrt p_i) (I - 1 p_i^T), i.e. row c = sqrt(p_ic) (e_c - p_i), one checks
L_i^T L_i = diag(p) - 2 p p^T + p (sum_c p_c) p^T = S_i, so H = (1/N) sum_i A_i^T A_i with
A_i = L_i J_i. Row c of A_i is the input gradient of sum_j L_i,cj logit_ij, so one forward and K
backward passes give every A_i of a chunk (``factor_chunks``). On the shared 2-core CPU this loop,
``is_grads_batched`` and torch.func's vmap(jacrev) timed within the (large) noise of each other,
except vmap(jacrev), 2-5x slower on preresnet20; the loop holds one backward graph at a time, the
others K at once.

From A: the D x D Gram accumulated chunk by chunk and ``eigh`` in float64 (``exact_streaming``;
an SVD of A when N*K < D), or the explicit Gram operator for Lanczos, two matmuls a product
(``GramOperator``, the ``gram-lanczos`` path). ``SampleFactors`` keeps A, so the spectrum of any
weighted subset of samples costs no new backward pass; ``group_spectra`` gives the exact top pair of
each group's Hessian (e.g. per label). Also here: the memory each of these needs (the planner in
:mod:`trainables.spectrum.hessian` weighs them against the budget) and the eval-mode copy every path works on.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from trainables.errors import SweeperError
from trainables.spectrum.lanczos import ritz_residuals
from trainables.spectrum.spectra import GroupSpectra, Spectrum

EXACT_BYTES_PER_D2 = 24  # eigh in float64 holds the Gram, the eigenvectors and about one D x D of workspace


def chunk_bytes_per_sample(classes: int, d: int, itemsize: int) -> int:
    """Bytes one sample's factors take while a chunk is turned into A: the K gradient rows, their
    stacked copy (``itemsize`` each) and two float64 copies (scaled and, for the SVD, kept)."""
    return classes * d * (2 * itemsize + 16)


def chunk_within(budget_bytes: float, held_bytes: float, classes: int, d: int, itemsize: int, chunk_size: int) -> int:
    """The largest chunk (at most ``chunk_size``, at least 1) whose factors fit next to ``held_bytes``."""
    per = chunk_bytes_per_sample(classes, d, itemsize)
    return max(1, min(chunk_size, int((budget_bytes - held_bytes) // per)))


class HessianMethodError(SweeperError):
    """A spectrum method that cannot run on this model or within the memory budget."""


def eval_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A private eval-mode, gradient-free copy in ``dtype``: the trained model is left untouched."""
    m = copy.deepcopy(model).to(dtype).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def ce_hessian_factor(p: torch.Tensor) -> torch.Tensor:
    """L with L^T L = diag(p) - p p^T (the CE Hessian in the logits), batched: (B, K) -> (B, K, K).

    Row c is sqrt(p_c) (e_c - p); see the module docstring for the check.
    """
    sq = p.sqrt()
    return torch.diag_embed(sq) - sq[:, :, None] * p[:, None, :]


def factor_chunks(
    model: nn.Module,
    x: torch.Tensor,
    chunk_size: int = 1000,
    factor: Callable[[torch.Tensor], torch.Tensor] = ce_hessian_factor,
) -> Iterator[torch.Tensor]:
    """Per-sample A_i = L_i J_i, (B, K, D) per chunk, from one forward and K backward passes.

    ``model`` must already be an eval-mode copy (:func:`eval_copy`) in ``x``'s dtype: in eval mode
    sample i's logits depend on x_i alone, so one backward of sum_i <l_i, logits_i> gives every
    l_i^T J_i of the chunk. Only one chunk's factors exist at a time. ``factor`` maps the
    probabilities (float64) to L; tests swap it for a wrong one.
    """
    for s in range(0, len(x), chunk_size):
        xc = x[s : s + chunk_size].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xc)
            lf = factor(logits.detach().to(torch.float64).softmax(dim=1)).to(logits.dtype)
            k = logits.shape[1]
            rows = []
            for c in range(k):
                # J^T w as the gradient of sum(logits * w), bit for bit: a tensor grad_outputs makes autograd import
                # torch.fx's symbolic shapes (sympy), 0.24 s once in every trial process
                (g,) = torch.autograd.grad((logits * lf[:, c, :]).sum(), xc, retain_graph=c < k - 1)
                rows.append(g.reshape(len(xc), -1))
        yield torch.stack(rows, dim=1)


def not_piecewise_linear(method: str, name: str) -> HessianMethodError:
    """The error for a J^T S J path (exact, gram-lanczos, gauss-newton) asked of a smooth model."""
    return HessianMethodError(
        f"hessian_method={method!r} is invalid for model {name!r}: it is not piecewise linear, so its "
        "input Hessian is not J^T S J; valid: auto, double-backward"
    )


def _require_piecewise_linear(model: nn.Module, method: str, name: str | None = None) -> None:
    if not getattr(model, "piecewise_linear", False):
        raise not_piecewise_linear(method, name or type(model).__name__)


def _row_weights(weights: torch.Tensor | None, n: int, device) -> torch.Tensor:
    """Sample weights normalised to sum 1 (a boolean mask selects samples); uniform when None."""
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
    w = torch.as_tensor(weights, device=device).to(torch.float64).reshape(-1)
    if w.shape[0] != n:
        raise ValueError(f"weights has {w.shape[0]} entries for {n} samples")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError("weights must be finite, >= 0 and not all zero")
    return w / w.sum()


class GramOperator:
    """v -> sum_i w_i A_i^T (A_i v) with A held explicitly: two matmuls per product.

    ``factors`` is (N, K, D); ``weights`` (N,) sum to 1. Has ``shape``, ``dtype``, ``device``, ``@``.
    """

    def __init__(self, factors: torch.Tensor, weights: torch.Tensor):
        n, k, d = factors.shape
        keep = weights > 0
        self.a = factors[keep].reshape(-1, d)
        self.rw = weights[keep].repeat_interleave(k).to(factors.dtype)
        self.shape = (d, d)
        self.dtype = factors.dtype
        self.device = factors.device
        self.products = 0

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1 if v.dim() == 1 else v.shape[1]
        av = self.a @ v.to(self.dtype)
        return self.a.T @ (av * (self.rw if v.dim() == 1 else self.rw[:, None]))

    def trace(self) -> float:
        """tr(A^T W A) = sum of the weighted squared row norms."""
        return float((self.a.to(torch.float64).pow(2).sum(1) * self.rw.to(torch.float64)).sum())


def exact_from_gram(gram: torch.Tensor, k: int) -> Spectrum:
    """Top-k pairs and the whole spectrum of a dense symmetric float64 matrix by ``eigh``."""
    evals, evecs = torch.linalg.eigh(gram)
    values, vectors = evals.flip(0), evecs.flip(1)[:, :k]
    res = ritz_residuals(gram, values[:k], vectors)
    return Spectrum(values[:k].clone(), vectors.clone(), 0, 1.0, res, True, values.cpu(), float(evals.sum()))


def exact_from_factor(a: torch.Tensor, k: int) -> Spectrum:
    """The same from a thin SVD of the (M, D) factor A (H = A^T A) when M < D: cheaper than D x D."""
    a = a.to(torch.float64)
    _, sv, vh = torch.linalg.svd(a, full_matrices=False)
    values = sv.pow(2)  # descending; the other D - M eigenvalues are exactly 0
    if len(values) < k:  # fewer rows than k: the zero eigenvalues' vectors are needed too
        return exact_from_gram(a.T @ a, k)
    vectors = vh[:k].T
    op = GramOperator(a[:, None, :], torch.ones(len(a), dtype=torch.float64, device=a.device))
    res = ritz_residuals(op, values[:k], vectors)
    return Spectrum(values[:k].clone(), vectors.contiguous(), 0, 1.0, res, True, values.cpu(), float(values.sum()))


class SampleFactors:
    """The per-sample factors A_i (N, K, D) of a piecewise-linear model's input Hessian, kept.

    H_w = sum_i w_i A_i^T A_i / sum_i w_i for any weights w >= 0 (a boolean mask selects a subset),
    with no new forward or backward pass: :meth:`spectrum` (exact), :meth:`operator` (for Lanczos),
    :meth:`gram` (dense). Memory N*K*D in ``dtype``.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        chunk_size: int = 1000,
        dtype: torch.dtype = torch.float32,
        name: str | None = None,
    ):
        _require_piecewise_linear(model, "exact", name)
        m = eval_copy(model, dtype)
        self.factors = torch.cat(list(factor_chunks(m, x.to(dtype), chunk_size)))
        self.n, self.classes, self.d = self.factors.shape
        self.item_shape = tuple(x.shape[1:])

    def operator(self, weights: torch.Tensor | None = None) -> GramOperator:
        """H_w as an explicit Gram operator (two matmuls a product)."""
        return GramOperator(self.factors, _row_weights(weights, self.n, self.factors.device))

    def gram(self, weights: torch.Tensor | None = None, chunk_size: int = 1000) -> torch.Tensor:
        """H_w as a dense D x D float64 matrix, accumulated chunk by chunk."""
        w = _row_weights(weights, self.n, self.factors.device)
        g = torch.zeros(self.d, self.d, dtype=torch.float64, device=self.factors.device)
        for s in range(0, self.n, chunk_size):
            a = self.factors[s : s + chunk_size].to(torch.float64) * w[s : s + chunk_size, None, None].sqrt()
            a = a.reshape(-1, self.d)
            g.addmm_(a.T, a)
        return g

    def spectrum(self, weights: torch.Tensor | None = None, k: int = 5) -> Spectrum:
        """Exact top-k pairs and whole spectrum of H_w (SVD of the selected rows when fewer than D)."""
        w = _row_weights(weights, self.n, self.factors.device)
        keep = w > 0
        if int(keep.sum()) * self.classes < self.d:
            a = self.factors[keep].to(torch.float64) * w[keep, None, None].sqrt()
            spec = exact_from_factor(a.reshape(-1, self.d), k)
        else:
            spec = exact_from_gram(self.gram(w), k)
        spec.method, spec.reason = "exact", "explicit factors"
        return spec


def subset_spectrum(factors: SampleFactors, subset: torch.Tensor, k: int = 5) -> Spectrum:
    """Exact spectrum of the input Hessian averaged over a subset of samples (boolean mask over the
    N samples) or with per-sample weights, e.g. per source class or poisoned vs clean samples."""
    return factors.spectrum(subset, k)


def group_spectra_bytes(groups: int, d: int) -> int:
    """Memory of :func:`group_spectra`: G float64 Grams plus eigh's workspace for one."""
    return 8 * groups * d * d + EXACT_BYTES_PER_D2 * d * d


def _add_by_group(grams: torch.Tensor, a: torch.Tensor, groups: torch.Tensor) -> None:
    """grams[c] += sum over the chunk's samples of group c of A_i^T A_i (``a``: (B, K, D) float64)."""
    d = a.shape[-1]
    for c in groups.unique().tolist():
        rows = a[groups == c].reshape(-1, d)
        grams[c].addmm_(rows.T, rows)


def _eig_by_group(grams: torch.Tensor, count: torch.Tensor) -> GroupSpectra:
    """Top eigenpair and trace of each H_g = grams[g] / n_g (NaN for an empty group)."""
    n_groups, d = grams.shape[0], grams.shape[-1]
    lam = torch.full((n_groups,), float("nan"), dtype=torch.float64)
    trace = torch.full((n_groups,), float("nan"), dtype=torch.float64)
    vectors = torch.zeros(n_groups, d, dtype=torch.float64)
    for c in range(n_groups):
        if count[c] == 0:
            continue
        h = grams[c] / int(count[c])
        top, vec = top_eigenpair(h)
        lam[c], trace[c], vectors[c] = top, h.diagonal().sum().cpu(), vec
    return GroupSpectra(lam, trace, count, vectors)


TOP_EIG_DENSE_D = 1024  # up to this side a full eigh is cheap (MNIST's 784: ~0.1 s); above, Lanczos (ARPACK)


def top_eigenpair(h: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The largest eigenvalue and its unit eigenvector of a symmetric float64 matrix (CPU tensors out).

    Per-class curvature needs only the top pair: a full ``eigh`` of CIFAR's 3072 x 3072 Gram takes ~5 s on
    2 cores, eleven per trial; ARPACK's Lanczos (``eigsh``, ``tol=0``: machine precision, a fixed seeded
    start vector) takes ~0.3 s. On a GPU, and up to :data:`TOP_EIG_DENSE_D`, ``eigh`` stays. Checked against
    ``eigh`` in float64 (tests/test_exact_hessian.py: eigenvalue to 1e-10 relative, vector to 1e-10 in 1 - |cos|).
    """
    d = h.shape[-1]
    if h.is_cuda or d <= TOP_EIG_DENSE_D:
        evals, evecs = torch.linalg.eigh(h)
        return float(evals[-1]), evecs[:, -1].cpu()
    import numpy as np
    from scipy.sparse.linalg import eigsh

    start = np.random.default_rng(0).standard_normal(d)  # fixed: the same vector, so the same numbers, each run
    w, u = eigsh(h.cpu().numpy(), k=1, which="LA", v0=start, tol=0)
    return float(w[0]), torch.from_numpy(u[:, 0].copy())


def group_spectra_fit(budget_bytes: float, n_groups: int, classes: int, d: int, itemsize: int, chunk_size: int) -> bool:
    """Whether per-group spectra fit the budget *beside a full chunk* of the spectrum's factors: they
    are an extra for detection and never shrink the spectrum's chunk (CIFAR-10 at the default
    1024 MiB: 981 MiB of Grams, so they are skipped unless ``hessian_dense_mb`` is raised)."""
    return group_spectra_bytes(n_groups, d) + chunk_size * chunk_bytes_per_sample(classes, d, itemsize) <= budget_bytes


def group_spectra(
    model: nn.Module,
    x: torch.Tensor,
    groups: torch.Tensor,
    n_groups: int,
    dtype: torch.dtype = torch.float32,
    chunk_size: int = 1000,
) -> GroupSpectra:
    """H_g = (1/n_g) sum_{i in g} A_i^T A_i for every group g (e.g. the label of each sample), exactly.

    One forward and K backward passes over the samples (:func:`factor_chunks`) accumulate G float64
    D x D Grams (:func:`group_spectra_bytes`); ``eigh`` of each gives its top eigenpair. Piecewise-
    linear models only (the J^T S J identity); the caller checks the memory against its budget.
    The exact spectrum computes the same from its own pass when asked (``groups`` of
    :func:`trainables.spectrum.hessian.input_hessian_spectrum`): this stand-alone pass serves the other paths.
    """
    _require_piecewise_linear(model, "exact")
    m = eval_copy(model, dtype)
    d = x[0].numel()
    grams = torch.zeros(n_groups, d, d, dtype=torch.float64, device=x.device)
    s = 0
    for a in factor_chunks(m, x.to(dtype), chunk_size):
        _add_by_group(grams, a.to(torch.float64), groups[s : s + len(a)].to(x.device))
        s += len(a)
    return _eig_by_group(grams, torch.bincount(groups.cpu(), minlength=n_groups)[:n_groups])


def exact_streaming(
    model: nn.Module, x: torch.Tensor, k: int, chunk_size: int, groups: torch.Tensor | None = None, n_groups: int = 0
) -> Spectrum:
    """The ``exact`` path's spectrum of H over ``x``: the Gram accumulated chunk by chunk (never N*K*D
    at once), or an SVD of A when N*K < D (A is then smaller than the Gram). ``model`` is an eval-mode
    copy (:func:`eval_copy`) in ``x``'s dtype. With ``groups``
    (Gram branch only) one Gram per group is accumulated instead and the total is their sum: the
    per-group spectra (``spec.groups``) cost no extra backward pass."""
    n, d = len(x), x[0].numel()
    g, kept, grams, s = None, [], None, 0
    for a in factor_chunks(model, x, chunk_size):
        small = n * a.shape[1] < d
        if small:
            kept.append(a.reshape(-1, d).to(torch.float64) / math.sqrt(n))
        elif groups is not None:
            if grams is None:
                grams = torch.zeros(n_groups, d, d, dtype=torch.float64, device=a.device)
            _add_by_group(grams, a.to(torch.float64), groups[s : s + len(a)].to(a.device))
        else:
            rows = a.reshape(-1, d).to(torch.float64) / math.sqrt(n)
            if g is None:
                g = torch.zeros(d, d, dtype=torch.float64, device=a.device)
            g.addmm_(rows.T, rows)
        s += len(a)  # samples, not rows
    if kept:
        return exact_from_factor(torch.cat(kept), k)
    if grams is not None:
        spec = exact_from_gram(grams.sum(0) / n, k)
        spec.groups = _eig_by_group(grams, torch.bincount(groups.cpu(), minlength=n_groups)[:n_groups])
        return spec
    return exact_from_gram(g, k)
