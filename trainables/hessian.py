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
Ritz values by 1; the input Hessian is indefinite). ``converged_eigenpairs`` adds the Ritz
residuals ||H v - lambda v|| / |lambda_1| and restarts with more iterations until they are below a
tolerance (issue 10, item 1).

The exact path (piecewise-linear networks). The logits of such a network are piecewise linear in
x, so their second derivative is zero almost everywhere and the input Hessian of sample i's CE is
exactly J_i^T S_i J_i, with J_i the K x D logit Jacobian and S_i = diag(p_i) - p_i p_i^T. With the
factor L_i = diag(sqrt p_i) (I - 1 p_i^T), i.e. row c = sqrt(p_ic) (e_c - p_i), one checks
L_i^T L_i = diag(p) - 2 p p^T + p (sum_c p_c) p^T = S_i, so H = (1/N) sum_i A_i^T A_i with
A_i = L_i J_i. Row c of A_i is the input gradient of sum_j L_i,cj logit_ij, so one forward and K
backward passes give every A_i of a chunk. On the shared 2-core CPU this loop, ``is_grads_batched``
and torch.func's vmap(jacrev) timed within the (large) noise of each other, except vmap(jacrev),
2-5x slower on preresnet20; the loop holds one backward graph at a time, the others K at once.
From A: the D x D Gram accumulated chunk by chunk and ``eigh`` in float64 (``exact``; an SVD of A
when N*K < D), or Lanczos on the explicit Gram operator, two matmuls a product (``gram-lanczos``).
``SampleFactors`` keeps A, so the spectrum of any weighted subset of samples costs no new
backward pass. ``input_hessian_spectrum`` picks among the paths (``plan_spectrum``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from linear_operator.utils.lanczos import lanczos_tridiag
from torch import nn

from .config import SweeperError

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


class InputHessian:
    """H = mean_i Hess_x CE(model(x_i), y_i), as a matrix-free symmetric operator on R^D, D = C*H*W."""

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        chunk_size: int = 1000,
        method: str = "double-backward",
        dtype: torch.dtype = torch.float32,
    ):
        if method not in ("double-backward", "gauss-newton"):
            raise ValueError(f"method={method!r} is invalid: must be double-backward or gauss-newton")
        self.model = eval_copy(model, dtype)
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
            xc, yc = self.x[s : s + self.chunk_size], self.y[s : s + self.chunk_size]
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
    iterations: int  # Lanczos iterations actually run (0: a dense decomposition)
    scale: float  # the norm estimate the operator was divided by
    residuals: torch.Tensor | None = None  # (k,) ||H v_j - lambda_j v_j|| / |lambda_1|; None: not measured
    converged: bool | None = None  # every finite residual <= the tolerance (always true for exact)
    all_eigenvalues: torch.Tensor | None = None  # the whole spectrum, descending (exact path only)
    trace: float | None = None  # tr H = ||A||_F^2 / N, when known without the whole spectrum
    method: str = ""  # the path that computed it (exact, gram-lanczos, double-backward, gauss-newton)
    reason: str = ""  # why that path was used
    groups: GroupSpectra | None = None  # per-group spectra, when asked for and the exact Gram path ran


def frobenius_estimate(op, probes: int, generator: torch.Generator) -> float:
    """Hutchinson: E||H z||^2 = ||H||_F^2 for z ~ N(0, I); ||H||_F lies in [|lambda|_max, sqrt(rank) |lambda|_max]."""
    d = op.shape[0]
    z = torch.randn(d, probes, generator=generator, dtype=torch.float64).to(device=op.device, dtype=op.dtype)
    return float(((op @ z).pow(2).sum(0).mean()).sqrt())


def top_eigenpairs(
    op,
    k: int = 5,
    iterations: int = 20,
    seed: int = 0,
    probes: int = 2,
    on_iteration: Callable[[int], None] | None = None,
) -> Spectrum:
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

    q, t = lanczos_tridiag(
        closure, max_iter=min(iterations, d), dtype=op.dtype, device=op.device, matrix_shape=(d, d), init_vecs=init
    )
    evals, evecs = torch.linalg.eigh(t)
    order = torch.argsort(evals, descending=True)[:k]
    values = evals[order] * scale
    vectors = q @ evecs[:, order]
    if len(values) < k:  # invariant subspace smaller than k (e.g. a linear model's rank-limited H)
        pad = k - len(values)
        values = torch.cat([values, torch.full((pad,), float("nan"), dtype=values.dtype, device=values.device)])
        vectors = torch.cat([vectors, torch.zeros(d, pad, dtype=vectors.dtype, device=vectors.device)], dim=1)
    return Spectrum(values, vectors, q.shape[-1], scale)


def ritz_residuals(op, values: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """||H v_j - lambda_j v_j|| / |lambda_1| for each pair (k products of ``op``); NaN where lambda_j is."""
    finite = torch.isfinite(values)
    out = torch.full(values.shape, float("nan"), dtype=torch.float64)
    if not bool(finite.any()):
        return out
    lam1 = float(values[finite].abs().max())
    v = vectors[:, finite].to(op.dtype)
    r = (op @ v).to(torch.float64) - v.to(torch.float64) * values[finite].to(torch.float64).to(v.device)
    norms = r.norm(dim=0).cpu()
    out[finite.cpu()] = norms / lam1 if lam1 > 0 else torch.zeros_like(norms)
    return out


def converged_eigenpairs(
    op,
    k: int = 5,
    iterations: int = 20,
    max_iterations: int | None = None,
    tol: float = 1e-3,
    seed: int = 0,
    on_iteration: Callable[[int], None] | None = None,
) -> Spectrum:
    """:func:`top_eigenpairs` with measured Ritz residuals, restarted until they are below ``tol``.

    Each round runs ``iterations`` Lanczos steps from the same seeded start vector, then applies
    the operator to the k Ritz vectors; while some ||H v - lambda v|| / |lambda_1| exceeds ``tol``
    the run restarts with twice the iterations, up to ``max_iterations`` (default: ``iterations``,
    i.e. no restart). A restart rather than a continuation keeps the solver a black box; doubling
    bounds the waste to about the cost of the last round. ``converged`` says whether the top-k
    residuals ended below ``tol``; a Krylov space that closed early (an invariant subspace smaller
    than k) is judged on the pairs it has.
    """
    d = op.shape[0]
    cap = max(iterations, max_iterations or iterations)
    it, ran = iterations, 0
    while True:
        # on_iteration counts steps over every round, so a progress display never runs backwards
        tick = None if on_iteration is None else (lambda i, ran=ran: on_iteration(ran + i))
        spec = top_eigenpairs(op, k, it, seed=seed, on_iteration=tick)
        ran += spec.iterations
        spec.residuals = ritz_residuals(op, spec.eigenvalues, spec.eigenvectors)
        finite = spec.residuals[torch.isfinite(spec.residuals)]
        spec.converged = bool(len(finite)) and bool((finite <= tol).all())
        closed = spec.iterations < min(it, d)  # stopped early: more iterations cannot help
        if spec.converged or closed or it >= min(cap, d):
            return spec
        it = min(2 * it, cap, d)


# ---------------------------------------------------------------------------- the exact path
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
                (g,) = torch.autograd.grad(logits, xc, lf[:, c, :], retain_graph=c < k - 1)
                rows.append(g.reshape(len(xc), -1))
        yield torch.stack(rows, dim=1)


def _not_piecewise_linear(method: str, name: str) -> HessianMethodError:
    return HessianMethodError(
        f"hessian_method={method!r} is invalid for model {name!r}: it is not piecewise linear, so its "
        "input Hessian is not J^T S J; valid: auto, double-backward"
    )


def _require_piecewise_linear(model: nn.Module, method: str, name: str | None = None) -> None:
    if not getattr(model, "piecewise_linear", False):
        raise _not_piecewise_linear(method, name or type(model).__name__)


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


@dataclass
class GroupSpectra:
    """Exact top eigenpair and trace of the input Hessian averaged over each group of samples."""

    lambda_1: torch.Tensor  # (G,) float64, NaN for a group with no sample
    trace: torch.Tensor  # (G,) tr H_g = ||A_g||_F^2 / n_g
    count: torch.Tensor  # (G,) samples per group
    vectors: torch.Tensor  # (G, D) top eigenvector of each H_g (zeros for an empty group)


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
    ``eigh`` in float64 (tests/test_hessian.py: eigenvalue to 1e-10 relative, vector to 1e-10 in 1 - |cos|).
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
    :func:`input_hessian_spectrum`): this stand-alone pass serves the other paths.
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


def spectrum_summary(all_eigenvalues: torch.Tensor | None, k: int, trace: float | None = None) -> dict[str, float]:
    """hessian_trace, effective_rank and top_k_trace_fraction of a (PSD) spectrum.

    effective_rank = exp(entropy of lambda_j / sum lambda) over the positive part (Roy & Vetterli
    2007): D for a flat spectrum, 1 for rank one. Roundoff-negative eigenvalues count as 0.
    """
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


# ---------------------------------------------------------------------------- choosing a path
def plan_spectrum(
    requested: str,
    piecewise_linear: bool,
    model_name: str,
    d: int,
    n: int,
    classes: int,
    dense_mb: float,
    itemsize: int = 4,
) -> tuple[str, str]:
    """(path, reason) for a spectrum of D = ``d`` inputs averaged over ``n`` samples, ``classes`` logits.

    exact needs a piecewise-linear model and either 24*D^2 bytes (float64 Gram, eigenvectors,
    workspace) within ``dense_mb`` MiB, or N*K < D and the float64 factor (16*N*K*D bytes with the
    SVD's copy) within it; gram-lanczos holds A (N*K*D*itemsize bytes); double-backward needs
    neither. Each also needs one chunk's factors (:func:`chunk_bytes_per_sample` per sample): the
    chunk is shrunk to what the budget leaves (:func:`chunk_within`), down to one sample. A smooth model asked for a J^T S J path is refused (:class:`HessianMethodError`); an
    explicit path whose memory is over the budget too.
    """
    budget = dense_mb * 2**20
    one = chunk_bytes_per_sample(classes, d, itemsize)  # a chunk of one sample at least sits next to them
    dense_bytes = EXACT_BYTES_PER_D2 * d * d + one
    svd_bytes = 16 * n * classes * d + one
    a_bytes = n * classes * d * itemsize + one
    exact_fits = dense_bytes <= budget or (n * classes < d and svd_bytes <= budget)
    if requested in ("exact", "gram-lanczos", "gauss-newton") and not piecewise_linear:
        raise _not_piecewise_linear(requested, model_name)
    mb = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    if requested == "exact":
        if not exact_fits:
            raise HessianMethodError(
                f"hessian_method='exact' needs {mb(min(dense_bytes, svd_bytes))} > hessian_dense_mb={dense_mb:g} "
                f"(D={d}); valid: raise hessian_dense_mb, or gram-lanczos / double-backward"
            )
        return "exact", "requested"
    if requested == "gram-lanczos":
        if a_bytes > budget:
            raise HessianMethodError(
                f"hessian_method='gram-lanczos' needs {mb(a_bytes)} for A > hessian_dense_mb={dense_mb:g}; "
                "valid: raise hessian_dense_mb, fewer hessian_samples, or double-backward"
            )
        return "gram-lanczos", "requested"
    if requested != "auto":
        return requested, "requested"
    if not piecewise_linear:
        return "double-backward", f"{model_name} is not piecewise linear: HVP Lanczos"
    if exact_fits:
        how = "SVD of A, N*K < D" if n * classes < d and dense_bytes > budget else f"D={d}: D x D fits"
        return "exact", f"piecewise linear, {how} in hessian_dense_mb={dense_mb:g}"
    if a_bytes <= budget:
        return (
            "gram-lanczos",
            f"piecewise linear, D={d}: D x D over hessian_dense_mb={dense_mb:g}, A ({mb(a_bytes)}) fits",
        )
    return "double-backward", f"D={d}: neither D x D nor A ({mb(a_bytes)}) fits in hessian_dense_mb={dense_mb:g}"


def _exact_streaming(
    model: nn.Module, x: torch.Tensor, k: int, chunk_size: int, groups: torch.Tensor | None = None, n_groups: int = 0
) -> Spectrum:
    """Gram accumulated chunk by chunk (never N*K*D at once), or an SVD of A when N*K < D (A is
    then smaller than the Gram). ``model`` is an eval-mode copy in ``x``'s dtype. With ``groups``
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


def input_hessian_spectrum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: str = "auto",
    k: int = 5,
    iterations: int = 20,
    max_iterations: int | None = None,
    tol: float = 1e-3,
    dense_mb: float = 1024,
    chunk_size: int = 1000,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    model_name: str | None = None,
    on_iteration: Callable[[int], None] | None = None,
    groups: torch.Tensor | None = None,
    n_groups: int = 0,
) -> Spectrum:
    """Top-k eigenpairs of H = mean_i Hess_x CE(model(x_i), y_i) by the path :func:`plan_spectrum`
    picks for ``method``; the returned :class:`Spectrum` says which (``method``, ``reason``).

    exact: whole spectrum, residuals measured, ``converged`` true. Lanczos paths: Ritz residuals
    and restarts per :func:`converged_eigenpairs`; ``on_iteration`` gets their Lanczos steps (the
    exact path has none). ``groups`` (a group index per sample, < ``n_groups``): the exact Gram path
    also returns each group's spectrum (``spec.groups``, :class:`GroupSpectra`) from the same pass
    when :func:`group_spectra_fit`; otherwise ``spec.groups`` stays None.
    """
    name = model_name or type(model).__name__
    n, d = len(y), x[0].numel()
    m = eval_copy(model, dtype)
    with torch.no_grad():
        classes = int(m(x[:1].to(dtype)).shape[1])
    path, reason = plan_spectrum(
        method,
        bool(getattr(model, "piecewise_linear", False)),
        name,
        d,
        n,
        classes,
        dense_mb,
        torch.empty((), dtype=dtype).element_size(),
    )
    itemsize, budget = torch.empty((), dtype=dtype).element_size(), dense_mb * 2**20
    if path == "exact":
        held = EXACT_BYTES_PER_D2 * d * d if n * classes >= d else 16 * n * classes * d
        by_group = (
            groups is not None
            and n * classes >= d
            and group_spectra_fit(budget, n_groups, classes, d, itemsize, min(chunk_size, n))
        )
        if by_group:
            held = group_spectra_bytes(n_groups, d)
        spec = _exact_streaming(
            m,
            x.to(dtype),
            k,
            chunk_within(budget, held, classes, d, itemsize, chunk_size),
            groups if by_group else None,
            n_groups,
        )
    else:
        if path == "gram-lanczos":
            chunk = chunk_within(budget, n * classes * d * itemsize, classes, d, itemsize, chunk_size)
            op = SampleFactors(model, x, chunk, dtype, name).operator()
        else:
            op = InputHessian(model, x, y, chunk_size, path, dtype)
        spec = converged_eigenpairs(op, k, iterations, max_iterations, tol, seed, on_iteration)
        if path == "gram-lanczos":
            spec.trace = op.trace()
    spec.method, spec.reason = path, reason
    return spec


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
