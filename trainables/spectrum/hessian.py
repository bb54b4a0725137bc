"""The input-space Hessian as an operator, and the entry point that picks how to take its spectrum (App. E.2).

``InputHessian`` applies H = (1/N) sum_i d^2/dx_i^2 CE(f(x_i), y_i) to a vector shared by all
samples (Listing 5), chunk by chunk, with the model in eval mode. It has ``shape``, ``dtype``,
``device`` and ``@`` so any eigensolver - or a dense comparison in a test - can use it.

Two exact products:
  * ``double-backward`` (Listing 5): grad of <grad_x L, v> with respect to x. Any network.
  * ``gauss-newton``: J^T S J v with S = diag(p) - p p^T the CE Hessian in the logits, J v from a
    forward-mode tangent and J^T from one backward. For piecewise-linear networks (ReLU, max-pool,
    eval BatchNorm) the logits have zero second derivative almost everywhere, so this *is* the
    input Hessian, at about half the cost. For GELU and other smooth activations it is not.

``input_hessian_spectrum`` picks among the paths (``plan_spectrum``): the exact Gram or factor
path and the explicit Gram operator of :mod:`trainables.spectrum.exact_hessian`, or scaled Lanczos
(:mod:`trainables.spectrum.lanczos`) on ``InputHessian``. What it returns, and the metrics read from it,
are in :mod:`trainables.spectrum.spectra`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from trainables.spectrum.exact_hessian import (
    EXACT_BYTES_PER_D2,
    HessianMethodError,
    SampleFactors,
    chunk_bytes_per_sample,
    chunk_within,
    eval_copy,
    exact_streaming,
    group_spectra_bytes,
    group_spectra_fit,
    not_piecewise_linear,
)
from trainables.spectrum.lanczos import converged_eigenpairs
from trainables.spectrum.spectra import Spectrum


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
        raise not_piecewise_linear(requested, model_name)
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
        spec = exact_streaming(
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
