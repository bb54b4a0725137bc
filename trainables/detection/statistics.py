"""Is this model backdoored? Trigger-agnostic statistics from the input Hessian's top eigenpairs.

A defender knows neither the trigger nor the target class; these statistics use only the trained
model, clean held-out images and the spectrum the trial already computed (``eigenvalues``,
``eigenvectors`` of H = mean_i Hess_x CE(f(x_i), y_i), in the normalized input space):

* **spectral shape**: lambda_1 / |lambda_2| and lambda_1 / tr(H), tr(H) by a seeded Hutchinson
  estimate (in the logit space for piecewise-linear nets). A rank-1 poison spike (Sec. 3.2,
  Thm 3.4) raises both.
* **spatial localisation** of each top eigenvector v: its per-pixel energy p(h, w) =
  sum_c v(c, h, w)^2 (sums to 1), the inverse participation ratio IPR = sum p^2 (1/(HW) for a
  uniform vector, 1 for a single pixel) and the largest energy fraction in any w x w window.
  A patch trigger should localise; a warp or a blend should not.
* **eigenvectors as candidate triggers** (flip concentration): add +-r ||x|| v_j to held-out clean
  images; the largest fraction of the non-c images that move into one class c names a candidate
  target. The same is measured for as many random directions, as a control.

Every scalar goes into the trial's final metrics; each entry's ``scores`` say which are scores and which
way is suspicious (:func:`score_direction`), and its ``access`` at which level they are reported.
:data:`DETECTORS` is the registry (:func:`register_detector` adds a :class:`DetectorEntry`: its
function of a :class:`DetectionContext`, the access it needs, its cost); :func:`run_detection` runs
it (and the baselines the config asks for) on a context. Pure PyTorch: nothing here imports Ray or MLflow.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trainables.detection.context import (  # noqa: F401 (re-exported: what a detector takes, gives and registers)
    ACCESS,
    Detection,
    DetectionContext,
    DetectionSettings,
    DetectorEntry,
    access_level,
)
from trainables.errors import SweeperError
from trainables.plugins import load_plugins
from trainables.spectrum.trace import gauss_newton_trace, hutchinson_trace

ORACLES: dict[str, str] = {
    "max_overlap_sq": "higher",  # the top-k eigenvectors' largest cos^2 with the trigger (Listing 7)
    "overlap_sq": "higher",  # v_1's cos^2 with the trigger
}
"""Metrics that read the attack's trigger: scored over populations as upper references at the ``oracle``
level, never as detectors (a defender cannot compute them)."""


def score_entry(name: str) -> DetectorEntry | None:
    """The registered detector or baseline whose ``scores`` declare metric ``name``, else None."""
    from trainables.detection.baselines import BASELINES

    load_plugins()  # a plugin's detector declares its own scores
    return next((e for e in (*DETECTORS.values(), *BASELINES.values()) if e.scores_metric(name)), None)


def score_direction(name: str) -> str | None:
    """``"higher"`` if a larger value of metric ``name`` is more suspicious, ``None`` if it is no score.

    Read from the entry that declares it (:attr:`DetectorEntry.scores`, patterns for the per-window and
    per-norm families) or :data:`ORACLES`; indices, classes, positions and seconds are no scores.
    """
    if name in ORACLES:
        return ORACLES[name]
    entry = score_entry(name)
    if entry is None:
        return None
    return next(d for pattern, d in entry.scores.items() if re.fullmatch(pattern, name))


def statistic_access(name: str, spectrum_split: str) -> str | None:
    """The access level (:data:`trainables.detection.context.LEVELS`) at which metric ``name`` of a trial
    whose spectrum averaged ``spectrum_split`` is reported: ``oracle`` for :data:`ORACLES`, else the level
    of the entry declaring it (a spectrum's statistic takes the level of the spectrum's data); None for
    no score."""
    if name in ORACLES:
        return "oracle"
    entry = score_entry(name)
    return None if entry is None else access_level(entry.access, spectrum_split)


def spectral_shape(eigenvalues: list[float], trace: float) -> dict[str, float]:
    """lambda_1 / |lambda_2| and lambda_1 / tr(H) (NaN where undefined)."""
    lam = [v for v in eigenvalues if not math.isnan(v)]
    l1 = lam[0] if lam else math.nan
    l2 = abs(lam[1]) if len(lam) > 1 else math.nan
    return {
        "det_trace": trace,
        "det_lambda_ratio": l1 / l2 if l2 and l2 > 0 else math.nan,
        "det_lambda_trace_ratio": l1 / trace if trace > 0 else math.nan,
    }


# ----------------------------------------------------------------------------- localisation
def pixel_energy(vectors: torch.Tensor) -> torch.Tensor:
    """(k, C, H, W) vectors -> (k, H, W) per-pixel energy, summed over channels, each map summing to 1."""
    e = vectors.double().pow(2).sum(1)
    return e / e.sum((1, 2), keepdim=True).clamp_min(1e-300)


def inverse_participation_ratio(energy: torch.Tensor) -> torch.Tensor:
    """(k, H, W) energy maps -> (k,) IPR = sum p^2, in [1/(HW), 1]; 1/IPR is the effective pixel count."""
    return energy.pow(2).sum((1, 2))


def window_fraction(energy: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Largest energy fraction in any w x w window of each map: (fraction, top row, left column), each (k,)."""
    sums = F.avg_pool2d(energy[:, None], w, stride=1)[:, 0] * (w * w)  # (k, H-w+1, W-w+1) window sums
    flat = sums.flatten(1)
    frac, pos = flat.max(1)
    cols = sums.shape[2]
    return frac, pos // cols, pos % cols


def localisation(vectors: torch.Tensor, windows: list[int]) -> Detection:
    """IPR and window fractions of the top-k eigenvectors; v_1's and the maximum over the top-k."""
    ok = vectors.flatten(1).norm(dim=1) > 0  # zero columns pad a rank-limited spectrum
    energy = pixel_energy(vectors[ok])
    ipr = inverse_participation_ratio(energy)
    index = ok.nonzero().squeeze(1)
    best = int(ipr.argmax())
    out = Detection(
        metrics={"det_ipr_1": float(ipr[0]), "det_ipr_max": float(ipr[best]), "det_ipr_index": int(index[best])},
        details={"ipr": ipr.tolist(), "windows": {}},
        images={"localisation": energy.float()[:, None]},
    )
    for w in windows:
        frac, row, col = window_fraction(energy, w)
        j = int(frac.argmax())
        out.metrics.update(
            {
                f"det_window_frac_w{w}": float(frac[j]),
                f"det_window_index_w{w}": int(index[j]),
                f"det_window_row_w{w}": int(row[j]),
                f"det_window_col_w{w}": int(col[j]),
            }
        )
        out.details["windows"][str(w)] = {"fraction": frac.tolist(), "row": row.tolist(), "col": col.tolist()}
    return out


# ----------------------------------------------------------------------------- flip concentration
@dataclass
class FlipTable:
    """Flip concentration of every (direction, sign, norm) perturbation, flattened to (P,)."""

    concentration: torch.Tensor  # (P,) max_c of the fraction of eligible non-c images predicted c
    target: torch.Tensor  # (P,) the class c attaining it
    direction: torch.Tensor  # (P,) index of the direction
    sign: torch.Tensor  # (P,) +1 / -1
    norm: torch.Tensor  # (P,) relative norm r


@torch.no_grad()
def flip_concentration(
    predict: Callable[[torch.Tensor], torch.Tensor],
    directions: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    norms: list[float],
    num_classes: int,
    batch_size: int = 1000,
) -> FlipTable:
    """Push held-out clean images along each direction and measure how one class collects them.

    For direction v (unit), sign s and relative norm r the images become x + s r rho v with rho the
    mean L2 norm of the images. For each class c the eligible images are those whose label and
    clean prediction both differ from c; the flip fraction is the share of them now predicted c,
    and the concentration is its maximum over c. No clipping to the pixel range: v is a probe of
    the model, not an image. ``predict`` maps a batch of images to class indices.
    """
    dirs = directions.flatten(1).to(x.dtype)
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k, n = dirs.shape[0], len(y)
    rho = x.flatten(1).norm(dim=1).mean()
    r = len(norms)  # every (direction, sign, norm), direction-major
    grid_dir = torch.arange(k).repeat_interleave(2 * r)
    grid_sign = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat_interleave(r).repeat(k)
    grid_norm = torch.tensor(norms, dtype=torch.float64).repeat(2 * k)
    coef = (grid_sign * grid_norm).to(device=x.device, dtype=x.dtype) * rho
    deltas = (coef[:, None] * dirs.to(x.device)[grid_dir.to(x.device)]).view(-1, *x.shape[1:])  # (P, C, H, W)
    base = predict(x)
    classes = torch.arange(num_classes, device=x.device)
    eligible = (y[None] != classes[:, None]) & (base[None] != classes[:, None])  # (K, N)
    per_group = max(1, batch_size // max(n, 1))  # perturbations evaluated per forward batch
    hits = []
    for s in range(0, len(deltas), per_group):
        d = deltas[s : s + per_group]
        pred = predict((x[None] + d[:, None]).reshape(-1, *x.shape[1:])).view(len(d), n)
        onehot = F.one_hot(pred, num_classes).to(x.dtype)  # (G, N, K)
        hits.append(torch.einsum("gnk,kn->gk", onehot, eligible.to(x.dtype)))
    frac = torch.cat(hits) / eligible.sum(1).clamp_min(1).to(x.dtype)  # (P, K)
    conc, target = frac.max(1)
    return FlipTable(conc.double().cpu(), target.cpu(), grid_dir, grid_sign, grid_norm)


def flip_summary(table: FlipTable, control: FlipTable, norms: list[float]) -> Detection:
    """Model-level scalars of a flip table, with a random-direction control table."""
    j = int(table.concentration.argmax())
    m = {
        "det_flip_max": float(table.concentration[j]),
        "det_flip_class": int(table.target[j]),
        "det_flip_index": int(table.direction[j]),
        "det_flip_sign": int(table.sign[j]),
        "det_flip_norm": float(table.norm[j]),
        "det_flip_random_max": float(control.concentration.max()),
    }
    m["det_flip_excess"] = m["det_flip_max"] - m["det_flip_random_max"]
    for r in norms:
        at = (table.norm - r).abs() < 1e-12
        best = int(torch.where(at, table.concentration, -1.0).argmax())
        m[f"det_flip_r{r:g}"] = float(table.concentration[best])
        m[f"det_flip_class_r{r:g}"] = int(table.target[best])  # the candidate target at this norm
        m[f"det_flip_random_r{r:g}"] = float(control.concentration[(control.norm - r).abs() < 1e-12].max())
    details = {key: getattr(table, key).tolist() for key in ("concentration", "target", "direction", "sign", "norm")}
    return Detection(metrics=m, details=details)


# ----------------------------------------------------------------------------- detectors
def spectral_detector(ctx: DetectionContext) -> Detection:
    """lambda ratios against tr(H) of the spectrum's own data: exact when the spectrum came from the
    J^T S J paths (exact, gram-lanczos: tr = ||A||_F^2, free), else a seeded estimate on a seeded
    subset of that data. Piecewise-linear nets use :func:`gauss_newton_trace`, others input-space
    :func:`hutchinson_trace`; both are unbiased for the trace of the spectrum's H.
    """
    spec, s = ctx.spectrum, ctx.settings
    if spec.trace is not None:
        return Detection(metrics={**spectral_shape(list(spec.eigenvalues), spec.trace), "det_trace_exact": 1.0})
    x, y = spec.x, spec.y
    if len(y) > s.trace_samples:
        idx = torch.randperm(len(y), generator=ctx.generator(23))[: s.trace_samples].to(y.device)
        x, y = x[idx], y[idx]
    estimate = gauss_newton_trace if getattr(ctx.model, "piecewise_linear", False) else hutchinson_trace
    trace = estimate(ctx.model, x, y, s.probes, ctx.generator(13), s.batch_size)
    return Detection(metrics={**spectral_shape(list(spec.eigenvalues), trace), "det_trace_exact": 0.0})


def localisation_detector(ctx: DetectionContext) -> Detection:
    """Localisation of the top-k eigenvectors at the configured windows."""
    return localisation(ctx.spectrum.eigenvectors, list(ctx.settings.windows))


def flips_with_control(
    ctx: DetectionContext, vecs: torch.Tensor, seed_offset: int
) -> tuple[FlipTable, FlipTable, list[float]]:
    """Flip concentration of ``vecs`` (n, C, H, W) on the held-out images at the configured norms, and
    of as many seeded random directions (generator offset ``seed_offset``) as the control."""
    s = ctx.settings
    norms = list(s.norms)
    raw, y = ctx.heldout
    x = ctx.normalize(raw)
    vecs = vecs.to(x.device)
    rand = torch.randn(vecs.shape, generator=ctx.generator(seed_offset), dtype=torch.float64).to(x.device)
    table = flip_concentration(ctx.predict, vecs, x, y, norms, s.num_classes, s.batch_size)
    control = flip_concentration(ctx.predict, rand, x, y, norms, s.num_classes, s.batch_size)
    return table, control, norms


def flip_detector(ctx: DetectionContext) -> Detection:
    """Flip concentration of the top-k eigenvectors against as many seeded random directions."""
    vecs = ctx.spectrum.eigenvectors
    table, control, norms = flips_with_control(ctx, vecs[vecs.flatten(1).norm(dim=1) > 0], 17)
    return flip_summary(table, control, norms)


def class_curvature(lambda_1: torch.Tensor, trace: torch.Tensor) -> dict[str, float]:
    """Model-level scores from the classes' input-Hessian spectra H_c (samples grouped by label).

    A poisoned training set puts its triggered samples in the target class, where they are a large
    share of the samples (θN of about N/K) rather than θ of all: if the trigger carries curvature, the
    target class's lambda_1 stands out. Scored like Neural Cleanse's MAD test (Wang et al. 2019) but on
    log lambda_1 (curvature varies multiplicatively between classes) and on the high side:
    (max_c log lambda_c - median) / (1.4826 MAD). Also max/median of lambda_1 and the largest
    lambda_1(H_c)/tr(H_c), each with its class (the candidate target). Classes with no sample are
    left out; fewer than three classes give no score.
    """
    ok = torch.isfinite(lambda_1) & (lambda_1 > 0)
    if int(ok.sum()) < 3:
        return {}
    idx = torch.nonzero(ok).flatten()
    lam, tr = lambda_1[ok].double(), trace[ok].double()
    logl = lam.log()
    med = logl.quantile(0.5)
    mad = 1.4826 * (logl - med).abs().quantile(0.5)
    share = lam / tr
    return {
        "det_class_lambda_anomaly": float((logl.max() - med) / mad.clamp_min(1e-12)),
        "det_class_lambda_ratio": float(lam.max() / lam.quantile(0.5)),
        "det_class_lambda_class": int(idx[lam.argmax()]),
        "det_class_share_max": float(share.max()),
        "det_class_share_class": int(idx[share.argmax()]),
    }


def class_curvature_detector(ctx: DetectionContext) -> Detection:
    """Per-class exact spectra of the spectrum's own samples, scored by :func:`class_curvature`: from
    the exact spectrum's own Jacobian pass when it ran (the default), else one more pass
    (:func:`trainables.spectrum.exact_hessian.group_spectra`). Skipped, with the reason in its details, for a
    smooth model or when the K float64 D x D matrices do not fit ``hessian_dense_mb`` beside a full
    chunk (:func:`trainables.spectrum.exact_hessian.group_spectra_fit`: CIFAR-10 needs it raised to ~2 GiB).
    Also logs the oracle ``class_target_overlap_sq`` (Listing 7's cos^2 of the target class's top
    eigenvector with the trigger; uses the trigger, so it is no score)."""
    from trainables.spectrum.exact_hessian import group_spectra, group_spectra_bytes, group_spectra_fit
    from trainables.spectrum.spectra import listing7_overlap

    s, spec = ctx.settings, ctx.spectrum
    gs = spec.classes  # the exact spectrum computed them from its own Jacobian pass
    if gs is None:  # another path (or the SVD branch) ran: one pass of their own, under the same memory rule
        if not getattr(ctx.model, "piecewise_linear", False):
            return Detection(details={"skipped": f"{s.model} is not piecewise linear: no exact per-class spectra"})
        d = math.prod(s.image_shape)
        x, y = spec.x, spec.y
        dtype = torch.float64 if s.spectrum_dtype == "float64" else torch.float32
        chunk = min(s.batch_size, len(y))
        if not group_spectra_fit(
            s.dense_mb * 2**20,
            s.num_classes,
            s.num_classes,
            d,
            torch.empty((), dtype=dtype).element_size(),
            chunk,
        ):
            need = group_spectra_bytes(s.num_classes, d) / 2**20
            return Detection(
                details={
                    "skipped": f"{s.num_classes} classes x D={d}: {need:.0f} MiB of matrices "
                    f"beside a chunk of {chunk} samples exceed hessian_dense_mb="
                    f"{s.dense_mb:g} (raise it to compute them)"
                }
            )
        gs = group_spectra(ctx.model, x, y, s.num_classes, dtype, chunk)
    m = class_curvature(gs.lambda_1, gs.trace)
    if s.target is not None and int(gs.count[s.target]) > 0 and ctx.trigger_direction is not None:
        m["class_target_overlap_sq"] = listing7_overlap(gs.vectors[s.target], ctx.trigger_direction) ** 2
    details = {"lambda_1": gs.lambda_1.tolist(), "trace": gs.trace.tolist(), "count": gs.count.tolist()}
    # each class's top eigenvector as a candidate trigger: pushed along it, do held-out images of other
    # classes land in one class? (flip concentration, as for the global top-k; random directions as control)
    present = gs.count > 0
    if bool(present.any()):
        table, control, _ = flips_with_control(ctx, gs.vectors[present].reshape(-1, *s.image_shape), 29)
        best = int(table.concentration.argmax())
        classes = torch.nonzero(present).flatten()
        m.update(
            {
                "det_class_flip_max": float(table.concentration[best]),
                "det_class_flip_class": int(table.target[best]),  # the class the images flip into
                "det_class_flip_source": int(classes[table.direction[best]]),  # whose eigenvector did it
                "det_class_flip_excess": float(table.concentration[best] - control.concentration.max()),
            }
        )
        details["flip"] = {key: getattr(table, key).tolist() for key in ("concentration", "target", "direction")}
    return Detection(metrics=m, details=details)


# ----------------------------------------------------------------------------- clean-data gradient alignment
def gradient_alignment(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per candidate target c, how one direction pushes clean images of other classes toward c.

    For the clean images whose label and prediction both differ from c, g_i = -grad_x CE(f(x_i), c) (the
    steepest way to make x_i look like class c), normalized per image; the class's *alignment* is the
    norm of their mean, in [0, 1] (1: every image's way to c is the same direction; about 1/sqrt(n) for
    unrelated ones), and its direction is that mean normalized. A backdoor is one input direction that
    sends every image to its target, so the target's alignment should stand out. First order, not
    curvature: on piecewise-linear nets the input Hessian of CE is J^T (diag p - p p^T) J whatever the
    label, so a per-class Hessian "under the hypothesis label = c" is the same matrix for every c and
    carries no hypothesis (docs/results.md). Returns (K,) float64 alignments (NaN for a class with no
    eligible image) and (K, C, H, W) unit directions.
    """
    model.eval()
    k = num_classes
    with torch.no_grad():
        pred = torch.cat([model(x[s : s + batch_size]).argmax(1) for s in range(0, len(x), batch_size)])
    align = torch.full((k,), math.nan, dtype=torch.float64)
    dirs = torch.zeros(k, *x.shape[1:], dtype=torch.float64)
    for c in range(k):
        sel = (y != c) & (pred != c)
        if not bool(sel.any()):
            continue
        xs = x[sel]
        total = torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device)
        for s in range(0, len(xs), batch_size):
            xb = xs[s : s + batch_size].detach().requires_grad_(True)
            target = torch.full((len(xb),), c, device=x.device)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xb), target, reduction="sum"), [xb])
            g = -g.flatten(1).double()  # per-image gradients: the images are independent in the sum
            total += (g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)).sum(0).view(x.shape[1:])
        mean = total / len(xs)
        align[c] = float(mean.norm())
        dirs[c] = (mean / mean.norm().clamp_min(1e-300)).cpu()
    return align, dirs


def gradient_detector(ctx: DetectionContext) -> Detection:
    """Clean-data statistics from :func:`gradient_alignment` on the clean held-out images: the largest
    alignment, its MAD anomaly on log scale (high side, like the per-class curvature), and the flip
    concentration of the classes' directions against as many random ones (the candidate triggers)."""
    s = ctx.settings
    raw, y = ctx.heldout
    align, dirs = gradient_alignment(ctx.model, ctx.normalize(raw), y, s.num_classes, s.batch_size)
    ok = torch.isfinite(align) & (align > 0)
    m: dict[str, float] = {}
    if int(ok.sum()) >= 3:
        idx = torch.nonzero(ok).flatten()
        logs = align[ok].log()
        med = logs.quantile(0.5)
        mad = 1.4826 * (logs - med).abs().quantile(0.5)
        m.update(
            {
                "det_grad_align_max": float(align[ok].max()),
                "det_grad_align_anomaly": float((logs.max() - med) / mad.clamp_min(1e-12)),
                "det_grad_align_class": int(idx[align[ok].argmax()]),
            }
        )
        table, control, _ = flips_with_control(ctx, dirs[ok].float(), 37)
        best = int(table.concentration.argmax())
        m.update(
            {
                "det_grad_flip_max": float(table.concentration[best]),
                "det_grad_flip_class": int(table.target[best]),
                "det_grad_flip_excess": float(table.concentration[best] - control.concentration.max()),
            }
        )
    return Detection(metrics=m, details={"alignment": align.tolist()})


# ----------------------------------------------------------------------------- costs (sweeper plan)
# Each in CPU seconds from the model's per-sample step time ``per`` (``sweeper.costs``'s rough model).
def _spectral_cost(s: DetectionSettings, per: float, n: int, train_size: int) -> float:
    """The trace estimate: one HVP per probe and sample (the exact path needs none: counted anyway, an
    upper bound)."""
    return s.probes * min(s.trace_samples, n) * per * 3


def _localisation_cost(s: DetectionSettings, per: float, n: int, train_size: int) -> float:
    """Nothing beyond the spectrum: energy maps of its eigenvectors."""
    return 0.0


def _flip_cost(s: DetectionSettings, per: float, n: int, train_size: int) -> float:
    """Forward passes of the held-out images pushed along each top eigenvector at each norm, both signs."""
    return s.samples * len(s.norms) * s.top_k * 2 * per


def _class_cost(s: DetectionSettings, per: float, n: int, train_size: int) -> float:
    """The per-class spectra come from the exact spectrum's pass: each class's eigenvector and a random
    one flipped, both signs."""
    return s.samples * len(s.norms) * s.num_classes * 4 * per


def _gradient_cost(s: DetectionSettings, per: float, n: int, train_size: int) -> float:
    """A backward pass of each held-out image toward each other class, then each class's direction and a
    random one flipped, both signs."""
    return s.samples * s.num_classes * per * 2 + s.samples * len(s.norms) * s.num_classes * 4 * per


# ----------------------------------------------------------------------------- registry
DETECTORS: dict[str, DetectorEntry] = {}


def register_detector(entry: DetectorEntry) -> DetectorEntry:
    """Add a detector: every trial with ``detect`` on (and a spectrum) runs it after the built-in ones,
    its metrics join the trial's, and ``sweeper plan`` adds its ``cost``; its ``params`` become fields."""
    if entry.params:
        from trainables.fields import register_fields

        register_fields(f"detector {entry.name}", entry.params, group="detection")
    DETECTORS[entry.name] = entry
    return entry


# every statistic reads the spectrum (so its samples); flips push clean held-out images
SPECTRUM_ACCESS = ("data-free", "spectrum-samples")
register_detector(
    DetectorEntry(
        "spectral",
        spectral_detector,
        SPECTRUM_ACCESS,
        _spectral_cost,
        scores={
            "det_lambda_ratio": "higher",  # lambda_1 / |lambda_2|: a single dominant spike
            "det_lambda_trace_ratio": "higher",  # lambda_1 / tr(H): the share of curvature in one direction
        },
    )
)
register_detector(
    DetectorEntry(
        "localisation",
        localisation_detector,
        SPECTRUM_ACCESS,
        _localisation_cost,
        scores={
            "det_ipr_1": "higher",  # IPR of v_1's pixel energy: localised top eigenvector
            "det_ipr_max": "higher",  # the largest IPR among the top-k eigenvectors
            r"det_window_frac_w\d+": "higher",  # the largest w x w window energy fraction among the top-k
        },
    )
)
register_detector(
    DetectorEntry(
        "flip",
        flip_detector,
        (*SPECTRUM_ACCESS, "clean-data"),
        _flip_cost,
        scores={
            "det_flip_max": "higher",  # flip concentration of the best eigenvector (max over j, sign, norm)
            "det_flip_excess": "higher",  # det_flip_max minus the same maximum over random directions
            r"det_flip_r[0-9.e+-]+": "higher",  # at one relative norm (det_flip_class_r{r}, its class, is none)
        },
    )
)
register_detector(
    DetectorEntry(
        "class",
        class_curvature_detector,
        (*SPECTRUM_ACCESS, "clean-data"),
        _class_cost,
        scores={
            "det_class_lambda_anomaly": "higher",  # MAD anomaly index of the largest per-class log lambda_1(H_c)
            "det_class_lambda_ratio": "higher",  # max_c lambda_1(H_c) / median_c lambda_1(H_c)
            "det_class_share_max": "higher",  # max_c lambda_1(H_c) / tr(H_c): one class's curvature in one direction
            "det_class_flip_max": "higher",  # flip concentration of the classes' top eigenvectors
            "det_class_flip_excess": "higher",  # det_class_flip_max minus the same over random directions
        },
    )
)
# reads no spectrum, only the model and the clean held-out images (issue 22's clean-data statistic); it runs
# with the other statistics, so with --detect (which needs --hessian)
register_detector(
    DetectorEntry(
        "gradient",
        gradient_detector,
        ("data-free", "clean-data"),
        _gradient_cost,
        scores={
            "det_grad_align_max": "higher",  # the largest alignment of the ways to one class
            "det_grad_align_anomaly": "higher",  # its MAD anomaly index on log scale (high side)
            "det_grad_flip_max": "higher",  # flip concentration of the classes' directions (max over c, sign, norm)
            "det_grad_flip_excess": "higher",  # minus the same over as many random directions
        },
    )
)


def planned(settings: DetectionSettings) -> list[DetectorEntry]:
    """The entries a trial with these settings runs, in order: every detector when the statistics are
    on, then the configured baselines. A name both a detector and a baseline is refused (their metrics
    and details would mix)."""
    from trainables.detection.baselines import BASELINES

    load_plugins()  # detectors and baselines registered by SWEEPER_PLUGINS / entry points
    both = sorted(set(DETECTORS) & set(BASELINES))
    if both:
        raise SweeperError(f"{', '.join(both)}: registered both as a detector and as a baseline")
    entries = list(DETECTORS.values()) if settings.detect else []
    return entries + [BASELINES[name] for name in settings.baselines]


def needed_access(settings: DetectionSettings) -> set[str]:
    """Every access level the entries to run declare: what a detection context must hold."""
    return {level for entry in planned(settings) for level in entry.access}


def detection_cost(settings: DetectionSettings, per: float, n: int, train_size: int) -> float:
    """Rough CPU seconds of the entries to run, each by its declared ``cost`` (``sweeper plan``)."""
    return sum((entry.cost(settings, per, n, train_size) for entry in planned(settings)), 0.0)


def run_detection(ctx: DetectionContext) -> tuple[dict[str, float], dict[str, Any]]:
    """Every detector (when the statistics are on) and the configured baselines, on ``ctx``.

    Returns (scalar metrics, artifacts): ``detection`` (a JSON-able dict of every detail) and one
    ``(n, C|1, H, W)`` image stack per picture (localisation maps, NC's reversed triggers).
    """
    from trainables.detection.baselines import BASELINES

    runs = planned(ctx.settings)
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    images: dict[str, torch.Tensor] = {}
    t_all = time.perf_counter()
    for entry in runs:
        name = entry.name
        t0 = time.perf_counter()
        found = entry.fn(ctx)
        found.metrics[f"{name}_seconds" if name in BASELINES else f"det_{name}_seconds"] = time.perf_counter() - t0
        metrics.update(found.metrics)
        details[name] = found.details
        images.update(found.images)
    if runs:
        metrics["det_seconds"] = time.perf_counter() - t_all
    artifacts: dict[str, Any] = {}
    if runs:
        artifacts["detection"] = {
            "metrics": metrics,
            "details": details,
            "directions": {k: score_direction(k) for k in metrics if score_direction(k)},
        }
        artifacts["detection_images"] = {k: v.float().cpu() for k, v in images.items()}
    return metrics, artifacts
