"""The backdoor detectors a reviewer will ask for, implemented from their papers.

* **Neural Cleanse** (Wang et al. 2019), model-level: reverse-engineers per class the smallest
  mask + pattern that sends clean images to that class; a backdoor target needs an anomalously
  small mask (MAD anomaly index > 2).
* **Spectral Signatures** (Tran et al. 2018), data-level: per class, the squared projection of each
  sample's *centred* penultimate features on their top singular vector.
* **Activation Clustering** (Chen et al. 2018), data-level: per class, 2-means on PCA-reduced
  penultimate activations (the paper uses ICA; see :func:`activation_clustering` for why we do
  not by default); a backdoor splits the target class into two well-separated clusters.
* **MM-BD** (Wang et al., IEEE S&P 2024), model-level and data-free: per class, the largest logit margin
  reachable inside the input box; a backdoor target's margin is anomalously large against a null fitted
  to the other classes' (:func:`max_margins`, :func:`margin_anomaly`).

The data-level baselines score every training sample as trained (trigger applied, poisoned
labels); with the poison mask known to the trial, their per-sample AUROC at finding the poisoned
samples is logged too (``roc_auc_score``; NaN for a clean model, which has no positives).
:data:`BASELINES` is the registry (name -> :class:`~trainables.detection.context.DetectorEntry`,
added by :func:`register_baseline`; ``detect_baselines`` names them); each entry's ``scores`` give its
model-level scores' directions. Pure PyTorch + scikit-learn; nothing here imports Ray or MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from trainables.detection.context import Detection, DetectionContext, DetectionSettings, DetectorEntry

if TYPE_CHECKING:  # torch loads at the first computation: the CLI reads these registries without it
    import torch
    from torch import nn


def _auroc(scores: np.ndarray, mask: np.ndarray) -> float:
    """Per-sample AUROC of ``scores`` at finding ``mask``; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    if mask.all() or not mask.any():
        return math.nan
    return float(roc_auc_score(mask, scores))


# ----------------------------------------------------------------------------- Neural Cleanse
@dataclass
class CleanseResult:
    """Neural Cleanse's reversed triggers, one per class."""

    masks: torch.Tensor  # (K, H, W) in [0, 1]
    patterns: torch.Tensor  # (K, C, H, W) in [0, 1]
    l1: torch.Tensor  # (K,) L1 norms of the masks
    success: torch.Tensor  # (K,) fraction of fresh clean images the kept reversed trigger sends to the class
    anomaly: torch.Tensor  # (K,) MAD anomaly index, signed: > 0 for masks smaller than the median


def mad_anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """Wang et al. 2019, Sec. 4.2: (median(l) - l_t) / (1.4826 * median_t |l_t - median(l)|).

    Signed so that a positive value means a mask smaller than the median (the only side NC flags);
    the 1.4826 makes the MAD a consistent estimator of a normal distribution's std.
    """
    norms = norms.double()
    med = norms.quantile(0.5)  # the mean of the two middle values, as NC's np.median (torch.median takes the lower)
    mad = 1.4826 * (norms - med).abs().quantile(0.5)
    return (med - norms) / mad.clamp_min(1e-12)


def neural_cleanse(
    model: nn.Module,
    x: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    steps: int = 300,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    init_cost: float = 1e-3,
    lr: float = 0.1,
    target_success: float = 0.99,
    patience: int = 10,
) -> CleanseResult:
    """Neural Cleanse (Wang et al., IEEE S&P 2019, Eq. 2-3), every class optimised at once.

    For each class t: x' = (1 - m) * x + m * p with m = (tanh(a) + 1) / 2 of shape (H, W) and
    p = (tanh(b) + 1) / 2 of shape (C, H, W), both in raw pixel space, and

        min_{m, p}  CE(f(normalize(x')), t) + lambda_t * |m|_1

    over clean images ``x`` (raw, in [0, 1]) by Adam (lr 0.1, betas (0.5, 0.9), as NC's code).
    lambda_t starts at ``init_cost`` and every ``patience`` steps is multiplied by 1.5 when the
    reversed trigger sent >= ``target_success`` of the window's batches to t, else divided by
    1.5**1.5 (NC's schedule, in steps instead of epochs). The smallest-L1 mask that reached
    ``target_success`` is kept (the last one if none did). Each step draws ``batch_size`` images
    per class, so one step costs num_classes * batch_size forward-backward passes.
    """
    import torch
    import torch.nn.functional as F

    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    k = num_classes
    n, c, h, w = x.shape
    dev = x.device
    a = (torch.randn(k, 1, h, w, generator=generator) * 0.1 - 1.0).to(dev).requires_grad_(True)  # masks start small
    b = (torch.randn(k, c, h, w, generator=generator) * 0.1).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=lr, betas=(0.5, 0.9))
    cost = torch.full((k,), init_cost, device=dev)
    targets = torch.arange(k, device=dev).repeat_interleave(batch_size)
    best_l1 = torch.full((k,), math.inf, device=dev)
    best_a, best_b = a.detach().clone(), b.detach().clone()
    hits = torch.zeros(k, device=dev)
    success = torch.zeros(k, device=dev)
    for step in range(steps):
        idx = torch.randint(0, n, (k * batch_size,), generator=generator).to(dev)
        xb = x[idx].view(k, batch_size, c, h, w)
        m = (torch.tanh(a) + 1) / 2
        p = (torch.tanh(b) + 1) / 2
        xa = (1 - m[:, None]) * xb + m[:, None] * p[:, None]
        logits = model(normalize(xa.view(-1, c, h, w)))
        ce = F.cross_entropy(logits, targets, reduction="none").view(k, batch_size).mean(1)
        l1 = m.flatten(1).sum(1)
        loss = (ce + cost * l1).sum()  # the classes' problems are independent: their sum separates
        ga, gb = torch.autograd.grad(loss, [a, b])  # model parameters get no gradient
        a.grad, b.grad = ga, gb
        opt.step()
        with torch.no_grad():
            success = (logits.argmax(1) == targets).float().view(k, batch_size).mean(1)
            better = (success >= target_success) & (l1 < best_l1)
            best_l1 = torch.where(better, l1, best_l1)
            best_a[better], best_b[better] = a.detach()[better], b.detach()[better]
            hits += success >= target_success
            if (step + 1) % patience == 0:
                cost = torch.where(hits == patience, cost * 1.5, cost / 1.5**1.5)
                hits.zero_()
    with torch.no_grad():
        never = torch.isinf(best_l1)
        best_a[never], best_b[never] = a.detach()[never], b.detach()[never]
        masks = ((torch.tanh(best_a) + 1) / 2)[:, 0]
        patterns = (torch.tanh(best_b) + 1) / 2
        l1 = masks.flatten(1).sum(1)
        # success of the kept triggers on fresh images (the optimisation's last batch says little)
        idx = torch.randint(0, n, (k * batch_size,), generator=generator).to(dev)
        xb = x[idx].view(k, batch_size, c, h, w)
        xa = (1 - masks[:, None, None]) * xb + masks[:, None, None] * patterns[:, None]
        pred = model(normalize(xa.view(-1, c, h, w))).argmax(1)
        success = (pred == targets).float().view(k, batch_size).mean(1)
    model.train(was_training)
    return CleanseResult(masks.cpu(), patterns.cpu(), l1.cpu(), success.cpu(), mad_anomaly_index(l1.cpu()))


def cleanse_summary(res: CleanseResult) -> dict[str, float]:
    """Model-level scalars: the largest anomaly index (small side), its class, flag (index > 2), mask L1s."""
    t = int(res.anomaly.argmax())
    return {
        "nc_anomaly_index": float(res.anomaly[t]),
        "nc_class": t,
        "nc_flagged": int(float(res.anomaly[t]) > 2.0),
        "nc_mask_l1_min": float(res.l1.min()),
        "nc_mask_l1_median": float(res.l1.double().quantile(0.5)),
        "nc_success_min": float(res.success.min()),
    }


def nc_baseline(ctx: DetectionContext) -> Detection:
    """Registry entry: Neural Cleanse on the clean held-out images."""
    raw, _ = ctx.heldout
    s = ctx.settings
    res = neural_cleanse(ctx.model, raw, ctx.normalize, s.num_classes, s.nc_steps, s.nc_batch_size, ctx.generator(19))
    return Detection(
        metrics=cleanse_summary(res),
        details={"mask_l1": res.l1.tolist(), "anomaly_index": res.anomaly.tolist(), "success": res.success.tolist()},
        images={"nc_masks": res.masks[:, None], "nc_triggers": res.masks[:, None] * res.patterns},
    )


# ----------------------------------------------------------------------------- Spectral Signatures
def spectral_signature_scores(features: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Tran et al., NeurIPS 2018, Algorithm 1, for one class's (n, d) representations R.

    With R_hat = mean_i R_i and v the top right singular vector of the centred matrix
    [R_i - R_hat]_i, the outlier score is tau_i = ((R_i - R_hat) . v)^2. Note that some public
    implementations (e.g. ART's ``spectral_signature_scores``) project the *uncentred* R_i on v and
    take |.|, not the square; see tests/test_baselines.py. Also returns sigma_1^2 / sum sigma^2,
    the share of the class's centred variance along v (a model-level summary of ours, not the paper's).
    """
    import torch

    r = features.double()
    centred = r - r.mean(0, keepdim=True)
    if len(r) < 2:
        return torch.zeros(len(r), dtype=torch.float64), math.nan
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    scores = (centred @ vh[0]).pow(2)
    share = float(s[0] ** 2 / (s**2).sum()) if float((s**2).sum()) > 0 else math.nan
    return scores, share


def spectral_signatures(
    features: torch.Tensor,
    labels: torch.Tensor,
    poison: torch.Tensor | None,
    num_classes: int,
    target: int | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Per-class Spectral Signatures over a training set: (metrics, per-sample scores).

    Scores are divided by their class mean so that classes are comparable when pooled;
    ``ss_auroc`` is the pooled per-sample AUROC at finding ``poison``, ``ss_auroc_target`` the
    AUROC within class ``target`` (evaluation only: a defender knows neither).
    """
    import torch

    scores = torch.zeros(len(labels), dtype=torch.float64)
    shares = torch.full((num_classes,), math.nan, dtype=torch.float64)
    labels = labels.cpu()
    for c in range(num_classes):
        sel = labels == c
        if int(sel.sum()) < 2:
            continue
        s, share = spectral_signature_scores(features[sel])
        scores[sel] = s / s.mean().clamp_min(1e-300)
        shares[c] = share
    cls = int(torch.nan_to_num(shares, nan=-1.0).argmax())
    m = {"ss_score_max": float(shares[cls]), "ss_class": cls}
    m.update(_data_level_auroc("ss", scores, labels, poison, target))
    return m, scores


def _data_level_auroc(
    prefix: str, scores: torch.Tensor, labels: torch.Tensor, poison: torch.Tensor | None, target: int | None
) -> dict[str, float]:
    if poison is None:
        return {}
    mask = poison.cpu().numpy().astype(bool)
    s = scores.numpy()
    out = {f"{prefix}_auroc": _auroc(s, mask)}
    if target is not None:
        sel = (labels == target).numpy()
        out[f"{prefix}_auroc_target"] = _auroc(s[sel], mask[sel])
    return out


def ss_baseline(ctx: DetectionContext) -> Detection:
    """Registry entry: Spectral Signatures on the training set as trained."""
    s, train = ctx.settings, ctx.training
    m, scores = spectral_signatures(ctx.train_features, train.y, train.poison, s.num_classes, s.target)
    return Detection(metrics=m, details={"score_quantiles": _quantiles(scores)})


# ----------------------------------------------------------------------------- Activation Clustering
def reduce_features(features: np.ndarray, dims: int = 10, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(n, d) -> (n, dims) by PCA (our default) or FastICA (Chen et al. 2018 and ART's default).

    Constant columns (dead ReLUs) are dropped first; FastICA falls back to PCA if it fails.
    """
    from sklearn.decomposition import PCA, FastICA

    x = features[:, features.std(0) > 1e-12]
    dims = max(1, min(dims, x.shape[1], len(x) - 1))
    if x.shape[1] <= dims:
        return x - x.mean(0)
    if method == "ica":
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence warnings on tiny classes
                return FastICA(
                    n_components=dims, max_iter=1000, tol=0.005, random_state=seed, whiten="unit-variance"
                ).fit_transform(x)
        except (ValueError, np.linalg.LinAlgError):
            pass
    return PCA(n_components=dims, random_state=seed).fit_transform(x)


def two_means(z: np.ndarray, seed: int = 0) -> dict[str, object]:
    """2-means on reduced activations: assignments, smaller cluster's relative size, silhouette, margins.

    The margin of sample i is (d_big - d_small) / (d_big + d_small) in [-1, 1], with d the distances
    to the two centroids: +1 deep in the smaller cluster.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(z)
    assign = km.labels_
    sizes = np.bincount(assign, minlength=2)
    small = int(np.argmin(sizes))
    d = np.linalg.norm(z[:, None, :] - km.cluster_centers_[None], axis=2)
    margin = (d[:, 1 - small] - d[:, small]) / np.maximum(d.sum(1), 1e-300)
    sil = math.nan
    if sizes.min() >= 2:
        sil = float(silhouette_score(z, assign, sample_size=min(len(z), 2000), random_state=seed))
    return {"assign": assign, "small_frac": float(sizes[small] / len(z)), "silhouette": sil, "margin": margin}


def activation_clustering(
    features: torch.Tensor,
    labels: torch.Tensor,
    poison: torch.Tensor | None,
    num_classes: int,
    target: int | None = None,
    dims: int = 10,
    method: str = "pca",
    seed: int = 0,
) -> tuple[dict[str, float], torch.Tensor]:
    """Activation Clustering (Chen et al., AAAI SafeAI 2019 / arXiv 2018), per class.

    Each class's penultimate activations are reduced to ``dims`` components and split by 2-means.
    The paper reduces with FastICA; we use PCA by default (``method="ica"`` gives the paper's):
    FastICA returns unit-variance components, which erases the large variance along the direction
    separating a poison cluster, and 2-means on them split our synthetic separated cluster at chance
    (per-sample AUROC 0.66, silhouette 0.08, tests/test_baselines.py's features) where PCA finds it. The paper flags a class by the smaller cluster's relative
    size and the silhouette score of the split; we log, per model, the largest silhouette
    (``ac_silhouette_max``), its class and that class's smaller-cluster fraction. Per-sample score:
    silhouette of the sample's class times its margin toward the smaller cluster, so samples of a
    cleanly split class rank above those of a class split arbitrarily.
    """
    import torch

    feats = features.double().cpu().numpy()
    labels = labels.cpu()
    scores = torch.zeros(len(labels), dtype=torch.float64)
    sils = np.full(num_classes, np.nan)
    fracs = np.full(num_classes, np.nan)
    for c in range(num_classes):
        sel = (labels == c).numpy()
        if sel.sum() < 4:
            continue
        res = two_means(reduce_features(feats[sel], dims, method, seed), seed)
        sils[c], fracs[c] = res["silhouette"], res["small_frac"]
        weight = 0.0 if math.isnan(res["silhouette"]) else res["silhouette"]
        scores[torch.from_numpy(sel)] = torch.from_numpy(weight * res["margin"])
    cls = int(np.nanargmax(sils)) if not np.isnan(sils).all() else 0
    m = {"ac_silhouette_max": float(sils[cls]), "ac_class": cls, "ac_small_frac": float(fracs[cls])}
    m.update(_data_level_auroc("ac", scores, labels, poison, target))
    return m, scores


def ac_baseline(ctx: DetectionContext) -> Detection:
    """Registry entry: Activation Clustering on the training set as trained."""
    s, train = ctx.settings, ctx.training
    m, scores = activation_clustering(ctx.train_features, train.y, train.poison, s.num_classes, s.target, seed=s.seed)
    return Detection(metrics=m, details={"score_quantiles": _quantiles(scores)})


# ----------------------------------------------------------------------------- MM-BD
def max_margins(
    model: nn.Module,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    image_shape: tuple[int, int, int],
    starts: int = 8,
    steps: int = 300,
    lr: float = 0.05,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """MM-BD's statistic (Wang et al., IEEE S&P 2024, Sec. 4.1), every class and start at once.

    For each class k: r_k = max over x in [0, 1]^D (raw pixels, the model's input domain) of the margin
    z_k(x) - max_{j != k} z_j(x), found by projected gradient ascent (Adam, ``lr``; the box by clamping
    after each step) from ``starts`` uniform random images; the best start's final margin. No data: only
    the model. Returns (K,) float64 margins. One step costs K * starts forward-backward passes.
    """
    import torch
    import torch.nn.functional as F

    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    k = num_classes
    x = torch.rand(k * starts, *image_shape, generator=generator).to(device).requires_grad_(True)
    targets = torch.arange(k, device=x.device).repeat_interleave(starts)
    own = F.one_hot(targets, k).bool()
    opt = torch.optim.Adam([x], lr=lr)

    def margins(z: torch.Tensor) -> torch.Tensor:
        return z.gather(1, targets[:, None])[:, 0] - z.masked_fill(own, -math.inf).max(1).values

    for _ in range(steps):
        (g,) = torch.autograd.grad(-margins(model(normalize(x))).sum(), [x])  # model parameters get no gradient
        x.grad = g
        opt.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
    with torch.no_grad():
        best = margins(model(normalize(x))).double().view(k, starts).max(1).values
    model.train(was_training)
    return best.cpu()


def margin_anomaly(margins: torch.Tensor, alpha: float = 0.05) -> dict[str, float]:
    """MM-BD's detection inference on the (K,) maximum margins.

    The largest statistic r_max is tested against a null fitted to the other K - 1: a Gamma distribution
    (scipy's maximum-likelihood ``gamma.fit``, shape, location and scale), as in the paper. Its p-value is
    that of the largest of K draws from the null, 1 - F(r_max)^K (the order statistic; our reading of the
    paper's test, stated in docs/results.md), computed from the survival function so that tiny p-values
    keep their digits. ``mmbd_score`` = -log10 p (higher: more suspicious), ``mmbd_flagged`` = p < alpha.
    """
    from scipy import stats

    r = margins.double().numpy()
    cls = int(np.argmax(r))
    null = np.delete(r, cls)
    out = {
        "mmbd_class": cls,
        "mmbd_margin_max": float(r[cls]),
        "mmbd_margin_median": float(np.median(r)),
    }
    if len(null) < 3 or np.ptp(null) <= 0:
        return {**out, "mmbd_pvalue": math.nan, "mmbd_score": math.nan, "mmbd_flagged": 0}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few points: scipy's optimizer may warn and still converge
        shape, loc, scale = stats.gamma.fit(null)
    log_sf = float(stats.gamma.logsf(r[cls], shape, loc=loc, scale=scale))
    if not math.isfinite(log_sf):  # far out in the tail scipy underflows: the tail's leading term instead
        z = (r[cls] - loc) / scale  # sf ~ z^(a-1) e^(-z) / Gamma(a) as z -> infinity
        log_sf = (shape - 1) * math.log(z) - z - math.lgamma(shape)
    k = len(r)
    sf = math.exp(log_sf)
    # 1 - (1 - sf)^K, without cancellation; below 1e-12 it is K * sf to 12 digits
    log_p = math.log(-math.expm1(k * math.log1p(-sf))) if sf > 1e-12 else math.log(k) + log_sf
    p = math.exp(log_p)
    return {**out, "mmbd_pvalue": p, "mmbd_score": float(-log_p / math.log(10)), "mmbd_flagged": int(p < alpha)}


def mmbd_baseline(ctx: DetectionContext) -> Detection:
    """Registry entry: MM-BD from the model alone (no image of any kind)."""
    s = ctx.settings
    r = max_margins(
        ctx.model,
        ctx.normalize,
        s.num_classes,
        s.image_shape,
        s.mmbd_starts,
        s.mmbd_steps,
        generator=ctx.generator(31),
        device=ctx.device,
    )
    return Detection(metrics=margin_anomaly(r), details={"max_margin": r.tolist()})


def _quantiles(scores: torch.Tensor) -> dict[str, float]:
    import torch

    q = torch.quantile(scores.float(), torch.tensor([0.0, 0.5, 0.9, 0.99, 1.0]))
    return dict(zip(("min", "median", "q90", "q99", "max"), q.tolist(), strict=True))


# ----------------------------------------------------------------------------- registry
def _nc_cost(s: DetectionSettings, per: float, n: int, train_size: int) -> float:
    """An Adam step over every class's batch per step (forward, backward to the input, update)."""
    return s.nc_steps * s.num_classes * s.nc_batch_size * per * 3


def _mmbd_cost(s: DetectionSettings, per: float, n: int, train_size: int) -> float:
    """Gradient ascent of every class's starts together: a forward-backward pass each, per step."""
    return s.mmbd_steps * s.num_classes * s.mmbd_starts * per * 2


def _features_cost(s: DetectionSettings, per: float, n: int, train_size: int) -> float:
    """One forward pass over the training set (the penultimate features); the clustering is cheap."""
    return train_size * per


BASELINES: dict[str, DetectorEntry] = {}  # config validation reads its names (``detect_baselines``)


def register_baseline(entry: DetectorEntry) -> DetectorEntry:
    """Add a baseline: a valid name of ``detect_baselines`` (validation, ``--help``); trials that name it
    run it and log its metrics, and ``sweeper plan`` adds its ``cost``; its ``params`` become fields."""
    if entry.params:
        from trainables.fields import register_fields

        register_fields(f"baseline {entry.name}", entry.params, group="detection")
    BASELINES[entry.name] = entry
    return entry


# NC reverses triggers on clean held-out images; SS and AC cluster the training set as trained
# (the poison mask only scores them, as per-sample AUROC)
# (the scores: "higher" is more suspicious)
register_baseline(
    DetectorEntry(
        "nc",
        nc_baseline,
        ("data-free", "clean-data"),
        _nc_cost,
        scores={
            "nc_anomaly_index": "higher",  # MAD anomaly index of the smallest reversed mask (Wang et al.: > 2 flags)
            "nc_flagged": "higher",  # 1 if some class has index > 2 on the small side, else 0
        },
    )
)
register_baseline(
    DetectorEntry(
        "ss",
        ss_baseline,
        ("data-free", "training-set"),
        _features_cost,
        scores={"ss_score_max": "higher"},  # max over classes of the top singular direction's share of variance
    )
)
register_baseline(
    DetectorEntry(
        "ac",
        ac_baseline,
        ("data-free", "training-set"),
        _features_cost,
        scores={"ac_silhouette_max": "higher"},  # max over classes of the 2-means silhouette (Chen et al.)
    )
)
# MM-BD needs the model only
register_baseline(
    DetectorEntry(
        "mmbd",
        mmbd_baseline,
        ("data-free",),
        _mmbd_cost,
        scores={
            "mmbd_score": "higher",  # -log10 of the largest max-margin's p-value under the Gamma null
            "mmbd_flagged": "higher",  # 1 if that p-value < 0.05, else 0
        },
    )
)
