"""Filter-and-retrain defences: score every training sample, remove the most suspicious, retrain.

A defender who holds the training set (BackdoorBench's protocol for Spectral Signatures and Activation
Clustering) scores each sample, removes a share of them and trains again from scratch. :data:`FILTERS` is
the registry of per-sample scorers (``defence_filter`` names one; ``none`` trains once, as always):

* ``curvature`` (ours): per class c the exact top eigenpair (lambda_c, v_c) of the class's input Hessian
  H_c = mean_{i in c} A_i^T A_i (A_i = L_i J_i, the piecewise-linear identity); sample i's score is its
  share of its class's top curvature, ||A_i v_{y_i}||^2 / lambda_{y_i} (the class mean of the scores is 1
  exactly, so the scores of different classes share a scale; pooled over classes it still fails, measured in
  docs/results.md). The suspect class is the one whose eigenvector, added to the defender's own
  images, sends most of them into one class (the flip test of the ``class`` detector, on a seeded subset
  of the training set instead of held-out images: no clean data beyond the training set is used).
* ``curvature-focus`` (ours): the same eigenpairs and suspect; sample i's score is the fraction of its *own*
  input curvature that lies along its class's top eigenvector, ||A_i v_{y_i}||^2 / tr(A_i^T A_i), in [0, 1].
  A poisoned sample's curvature is concentrated on the trigger direction; a clean sample of the target class
  may carry as much curvature along it, but spread over many other directions too (digits, theta = 0.1,
  5 seeds: precision 0.84 and recall 0.87 of the removal where the share reaches 0.61 / 0.63). Pooled over
  classes it fails as the share does (docs/results.md).
* ``ss``: Spectral Signatures' tau_i (Tran et al. 2018), per class divided by the class mean; the suspect
  class has the largest top-singular-value share.
* ``ac``: Activation Clustering's margin toward the smaller 2-means cluster times the class's silhouette
  (Chen et al. 2018); the suspect class has the largest silhouette.

Which samples go (:func:`select_removed`, ``filter_scope``): ``class`` (default) removes
``round(filter_fraction * N)`` of the highest-scoring samples of the suspect class, at most half of it
(under all-to-one every poisoned sample is labelled the target, and they are fewer than its clean samples
while theta (K - 1) < 1: a scorer that names the target and ranks its poisons first finds them all once
``filter_fraction >= theta``; the cap bounds what a wrong suspect costs, half a class rather than all of
it); ``pooled`` removes that many from the whole training set by score (all-to-all attacks spread the
poisons over every class).

Scorers read a :class:`~trainables.detection.context.DetectionContext` whose training set carries no
poison mask: they cannot see which samples are poisoned. The trial scores what they removed against the
mask afterwards (:func:`removal_quality`). Pure PyTorch and scikit-learn; the module's names load without
torch (the config reads the registry).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainables.plugins import load_plugins

if TYPE_CHECKING:
    import torch

    from trainables.detection.context import DetectionContext

SCOPES: tuple[str, ...] = ("class", "pooled")  # filter_scope's values (the config reads them here)


@dataclass
class FilterScores:
    """A scorer's verdict on the training set: a score per sample (higher: more suspicious) and the
    class it suspects (None: no class, ``class`` scope then falls back to pooled)."""

    scores: torch.Tensor  # (N,) float64, CPU
    suspect: int | None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FilterEntry:
    """One registered scorer: ``fn(ctx) -> FilterScores`` and what a defender must hold to run it."""

    name: str
    fn: Callable[[DetectionContext], FilterScores]
    access: str = "training-set"
    piecewise_linear: bool = False  # needs the J^T S J identity (refused before training on a smooth model)
    check: Callable[[Any, int], str | None] | None = None  # (config, training-set size) -> why it cannot run

    @property
    def doc(self) -> str:
        """The first line of the scorer's docstring (``--help`` shows it)."""
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""


def _class_curvature(ctx: DetectionContext):
    """What both curvature scorers share: the per-class exact top eigenpairs of the training set, each
    sample's ||A_i v_{y_i}||^2, and the suspect class (the flip test). Returns (spectra, shares, suspect,
    details)."""
    import torch

    from trainables.detection.statistics import flip_concentration
    from trainables.spectrum.exact_hessian import group_spectra

    s, train = ctx.settings, ctx.training
    dtype = torch.float64 if s.spectrum_dtype == "float64" else torch.float32
    gs = group_spectra(ctx.model, train.x, train.y, s.num_classes, dtype, min(s.batch_size, len(train.y)))
    share = class_direction_shares(ctx.model, train.x, train.y, gs.vectors, dtype, s.batch_size)
    present = torch.nonzero(gs.count > 0).flatten()
    # the suspect: the class whose top eigenvector, added to the defender's own images, flips most into one class
    idx = torch.randperm(len(train.y), generator=ctx.generator(41))[: s.samples].sort().values
    x, y = train.x[idx.to(train.x.device)], train.y[idx.to(train.y.device)]
    table = flip_concentration(
        ctx.predict,
        gs.vectors[present].reshape(-1, *s.image_shape),
        x,
        y,
        list(s.norms),
        s.num_classes,
        s.batch_size,
    )
    best = int(table.concentration.argmax())
    suspect = int(present[int(table.direction[best])])
    return gs, share, suspect, {"lambda_1": gs.lambda_1.tolist(), "flip_max": float(table.concentration[best])}


def _curvature(ctx: DetectionContext) -> FilterScores:
    """each sample's share of its class's top input-Hessian eigenvalue"""
    import torch

    gs, share, suspect, details = _class_curvature(ctx)
    lam = gs.lambda_1.to(share.dtype)[ctx.training.y.cpu()]
    scores = torch.where(lam > 0, share / lam.clamp_min(1e-300), torch.zeros_like(share))
    return FilterScores(scores, suspect, details)


def _curvature_focus(ctx: DetectionContext) -> FilterScores:
    """each sample's fraction of its own input curvature along its class's top eigenvector"""
    import torch

    gs, share, suspect, details = _class_curvature(ctx)
    s = ctx.settings
    dtype = torch.float64 if s.spectrum_dtype == "float64" else torch.float32
    total = sample_curvatures(ctx.model, ctx.training.x, dtype, s.batch_size)
    scores = torch.where(total > 0, share / total.clamp_min(1e-300), torch.zeros_like(share)).clamp(0.0, 1.0)
    return FilterScores(scores, suspect, details)


def _curvature_check(cfg: Any, train_size: int) -> str | None:
    """The class matrices must fit ``hessian_dense_mb`` beside a chunk, as the ``class`` detector's do."""
    from trainables.spectrum.exact_hessian import group_spectra_bytes, group_spectra_fit

    d = math.prod(cfg.image_shape)
    itemsize = 8 if cfg.hessian_dtype == "float64" else 4
    chunk = min(cfg.eval_batch_size, train_size)
    if group_spectra_fit(cfg.hessian_dense_mb * 2**20, cfg.num_classes, cfg.num_classes, d, itemsize, chunk):
        return None
    need = group_spectra_bytes(cfg.num_classes, d) / 2**20
    return (
        f"hessian_dense_mb={cfg.hessian_dense_mb} is too small for defence_filter={cfg.defence_filter}: "
        f"{cfg.num_classes} class matrices of D={d} take {need:.0f} MiB beside a chunk of {chunk} samples; "
        "raise hessian_dense_mb"
    )


def class_direction_shares(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    vectors: torch.Tensor,
    dtype: torch.dtype | None = None,
    batch_size: int = 1000,
) -> torch.Tensor:
    """||A_i v_{y_i}||^2 = u^T (diag(p_i) - p_i p_i^T) u with u = J_i v_{y_i}, for every sample, (N,) float64.

    One forward-mode Jacobian-vector product per chunk (``torch.func.jvp``) instead of the K backward
    passes the factors A_i would take; exact for a piecewise-linear net in eval mode (``dtype``: float64
    by default). Checked against
    the explicit factors in float64 (tests/test_filtering.py).
    """
    import torch

    from trainables.spectrum.exact_hessian import eval_copy

    dtype = dtype or torch.float64
    m = eval_copy(model, dtype)
    v = vectors.to(device=x.device, dtype=dtype)
    out = []
    for s in range(0, len(y), batch_size):
        xc = x[s : s + batch_size].to(dtype)
        tc = v[y[s : s + batch_size]].view_as(xc)
        logits, u = torch.func.jvp(m, (xc,), (tc,))
        p = logits.to(torch.float64).softmax(dim=1)
        u = u.to(torch.float64)
        out.append((p * u * u).sum(1) - (p * u).sum(1).pow(2))
    return torch.cat(out).clamp_min(0).cpu()


def sample_curvatures(
    model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None = None, batch_size: int = 1000
) -> torch.Tensor:
    """tr(A_i^T A_i) = ||A_i||_F^2, each sample's whole input curvature (the trace of its own input Hessian on
    a piecewise-linear net), for every sample, (N,) float64: from the explicit factors A_i = L_i J_i, one
    forward and K backward passes per chunk (``factor_chunks``); chunks hold at most ~64 MiB of factors.
    Checked against the Jacobian's sum_a p_a |J_a|^2 - |sum_a p_a J_a|^2 in float64 (tests/test_filtering.py)."""
    import torch

    from trainables.spectrum.exact_hessian import eval_copy, factor_chunks

    dtype = dtype or torch.float64
    m = eval_copy(model, dtype)
    with torch.no_grad():
        k = int(m(x[:1].to(dtype)).shape[1])
    per_sample = k * math.prod(x.shape[1:]) * torch.finfo(dtype).bits // 8
    chunk = max(1, min(batch_size, (64 << 20) // max(per_sample, 1)))
    out = [  # each chunk cast on its own: no float64 copy of the whole training set
        a.to(torch.float64).pow(2).sum((1, 2))
        for s in range(0, len(x), chunk)
        for a in factor_chunks(m, x[s : s + chunk].to(dtype), chunk)
    ]
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.float64)


def _ss(ctx: DetectionContext) -> FilterScores:
    """Spectral Signatures' outlier score over its class mean (Tran et al. 2018)"""
    from trainables.detection.baselines import spectral_signatures

    s, train = ctx.settings, ctx.training
    m, scores = spectral_signatures(ctx.train_features, train.y, None, s.num_classes)
    return FilterScores(scores, int(m["ss_class"]), {"ss_score_max": m["ss_score_max"]})


def _ac(ctx: DetectionContext) -> FilterScores:
    """Activation Clustering's margin toward the smaller cluster (Chen et al. 2018)"""
    from trainables.detection.baselines import activation_clustering

    s, train = ctx.settings, ctx.training
    m, scores = activation_clustering(ctx.train_features, train.y, None, s.num_classes, seed=s.seed)
    return FilterScores(scores, int(m["ac_class"]), {"ac_silhouette_max": m["ac_silhouette_max"]})


FILTERS: dict[str, FilterEntry] = {}  # defence_filter's names, besides "none"


def register_filter(entry: FilterEntry) -> FilterEntry:
    """Add a per-sample scorer: a valid ``defence_filter`` (validation, ``--help``, sweeps)."""
    FILTERS[entry.name] = entry
    return entry


def filter_names() -> list[str]:
    """``none`` and every registered scorer (plugins loaded first)."""
    load_plugins()
    return ["none", *FILTERS]


def filter_help() -> str:
    """The choices with what each scores, for ``--help``."""
    return "; ".join(["none = train once", *(f"{e.name} = {e.doc}" for e in FILTERS.values())])


register_filter(FilterEntry("curvature", _curvature, piecewise_linear=True, check=_curvature_check))
register_filter(FilterEntry("curvature-focus", _curvature_focus, piecewise_linear=True, check=_curvature_check))
register_filter(FilterEntry("ss", _ss))
register_filter(FilterEntry("ac", _ac))


def select_removed(
    scores: torch.Tensor, labels: torch.Tensor, suspect: int | None, fraction: float, scope: str
) -> torch.Tensor:
    """The samples to remove, (N,) bool: ``round(fraction * N)`` of the highest scores, from the suspect
    class only (``class`` scope; at most half of its samples) or from all samples (``pooled``, or no suspect).
    Ties go to the lower index (a stable order), so the same scores always remove the same samples."""
    import torch

    n = len(scores)
    k = int(round(fraction * n))
    pool = torch.arange(n)
    if scope == "class" and suspect is not None:
        pool = torch.nonzero(labels.cpu() == suspect).flatten()
        k = min(k, len(pool) // 2)
    order = torch.sort(-scores[pool].double(), stable=True).indices
    removed = torch.zeros(n, dtype=torch.bool)
    removed[pool[order[: min(k, len(pool))]]] = True
    return removed


def removal_quality(removed: torch.Tensor, poison: torch.Tensor, scores: torch.Tensor) -> dict[str, float]:
    """How well a filter did against the true poison mask (evaluation only; the scorer never saw it):
    precision = poisoned among removed, recall = removed among poisoned, and the scores' per-sample AUROC.
    NaN where undefined: no poisoned sample (theta 0: nothing to find) or nothing removed."""
    import numpy as np

    removed, poison = removed.cpu().bool(), poison.cpu().bool()
    hit = int((removed & poison).sum())
    n_removed, n_poison = int(removed.sum()), int(poison.sum())
    auroc = math.nan
    if 0 < n_poison < len(poison):
        from sklearn.metrics import roc_auc_score

        s = np.nan_to_num(scores.double().numpy(), nan=-1e300, posinf=1e300, neginf=-1e300)  # NaN ranks last
        auroc = float(roc_auc_score(poison.numpy(), s))
    return {
        "filter_removed": n_removed,
        "filter_precision": hit / n_removed if n_removed and n_poison else math.nan,
        "filter_recall": hit / n_poison if n_poison else math.nan,
        "filter_auroc": auroc,
        "filter_poisoned_left": n_poison - hit,
    }
