"""Penultimate-feature geometry of clean vs triggered test images (paper Appendix B, Table 3).

For every class c: the mean mu_c and per-dimension std sigma_c of clean class-c features, the same
(mu_c*, sigma_c*) for the triggered class-c images, and the distances of both means to the clean
target-class mean mu_t. Near-clone poisoning shows as d(mu_c*, mu_t) / d(mu_c, mu_t) << 1 and
||sigma_c*|| / ||sigma_c|| < 1: triggered images collapse onto the target manifold.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainables.networks.batching import forward_chunk

COLUMNS = (
    "class",
    "n",
    "mu_norm",
    "sigma_norm",
    "mu_trig_norm",
    "sigma_trig_norm",
    "sigma_ratio",
    "d_clean",
    "d_trig",
    "d_ratio",
)


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Penultimate features of ``x`` in eval mode, in chunks of ``batch_size`` (at most
    :data:`~trainables.networks.batching.CPU_FORWARD_CHUNK` on the CPU)."""
    model.eval()
    b = forward_chunk(batch_size, x.device)
    return torch.cat([model.features(x[s : s + b]) for s in range(0, len(x), b)])


def feature_geometry(
    clean: torch.Tensor, triggered: torch.Tensor, labels: torch.Tensor, target: int, num_classes: int
) -> list[dict[str, float]]:
    """One row per class present in ``labels`` (Table 3's columns); distances to the clean target mean."""
    clean, triggered = clean.double(), triggered.double()
    mu_t = clean[labels == target].mean(0)
    rows = []
    for c in range(num_classes):
        sel = labels == c
        n = int(sel.sum())
        if n == 0:
            continue
        fc, ft = clean[sel], triggered[sel]
        mu, mu_s = fc.mean(0), ft.mean(0)
        sd = fc.std(0, unbiased=False)
        sd_s = ft.std(0, unbiased=False)
        d, d_s = float((mu - mu_t).norm()), float((mu_s - mu_t).norm())
        rows.append(
            {
                "class": c,
                "n": n,
                "mu_norm": float(mu.norm()),
                "sigma_norm": float(sd.norm()),
                "mu_trig_norm": float(mu_s.norm()),
                "sigma_trig_norm": float(sd_s.norm()),
                "sigma_ratio": float(sd_s.norm() / sd.norm()) if sd.norm() > 0 else math.nan,
                "d_clean": d,
                "d_trig": d_s,
                "d_ratio": d_s / d if c != target and d > 0 else math.nan,
            }
        )
    return rows


def geometry_summary(rows: list[dict[str, float]], target: int) -> dict[str, float]:
    """Means over non-target classes of d*/d and sigma*/sigma."""
    other = [r for r in rows if r["class"] != target]

    def mean(key):
        vals = [r[key] for r in other if not math.isnan(r[key])]
        return sum(vals) / len(vals) if vals else math.nan

    return {"geom_d_ratio": mean("d_ratio"), "geom_sigma_ratio": mean("sigma_ratio")}
