"""Figures of detection over model populations: AUROC vs theta and ROC curves, a few statistics per panel
(the best of each family, oracles marked), and localisation maps (the per-pixel energy of a model's top
input-Hessian eigenvectors)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from .plots import file_tag, is_nan, save_figure, title_label  # noqa: E402
from .results import completed  # noqa: E402

# --------------------------------------------------------------------------- detection over populations
FAMILIES = (
    ("det_lambda_", "spectral shape"),
    ("det_ipr_", "localisation"),
    ("det_window_", "localisation"),
    ("det_flip_", "flip concentration"),
    ("det_class_", "per-class curvature"),
    ("det_grad_", "clean-data gradient alignment"),
    ("nc_", "baselines"),
    ("ss_", "baselines"),
    ("ac_", "baselines"),
    ("mmbd_", "baselines"),
)
ORACLE_FAMILY = "oracle (needs the trigger)"
# distinct colour and marker pairs; grey and black are kept for the oracles
STYLES = [
    ("C0", "o"),
    ("C1", "s"),
    ("C2", "^"),
    ("C3", "D"),
    ("C4", "v"),
    ("C5", "P"),
    ("C6", "X"),
    ("C8", "<"),
    ("C9", ">"),
]
ORACLE_STYLES = [("black", "o"), ("0.45", "s")]


def statistic_family(statistic: str, oracle: bool = False) -> str:
    """The family a detection statistic belongs to (spectral shape, localisation, flip concentration,
    per-class curvature, baselines, oracle): what one panel of the detection figure shows."""
    if oracle:
        return ORACLE_FAMILY
    return next((fam for prefix, fam in FAMILIES if statistic.startswith(prefix)), "other")


def _chunks(items: list[str], size: int) -> list[list[str]]:
    """``items`` in even chunks of at most ``size`` (5 in two panels: 3 + 2, not 4 + 1)."""
    n = max(1, math.ceil(len(items) / max(size, 1)))
    per = math.ceil(len(items) / n)
    return [items[i : i + per] for i in range(0, len(items), per)] or [[]]


def detection_panels(
    table: pd.DataFrame, panel_by: str | None = None, per_panel: int = 6
) -> list[tuple[str, list[str]]]:
    """(title, statistics) per panel: the non-oracle statistics grouped by family (or by the column
    ``panel_by`` of ``table``, e.g. an access level once statistics carry one), at most ``per_panel``
    lines a panel counting the oracles, which every panel repeats as its reference."""
    stats = table.drop_duplicates("statistic")
    oracles = stats.loc[stats["oracle"].astype(bool), "statistic"].tolist()
    rest = stats[~stats["oracle"].astype(bool)]
    if panel_by is not None and panel_by in rest.columns:
        # a panel per (group, family), groups in the column's order (access levels: least held first)
        keyed: dict[tuple[str, str], list[str]] = {}
        for s, g in zip(rest["statistic"], rest[panel_by], strict=True):
            keyed.setdefault((str(g), statistic_family(s)), []).append(s)
        order = list(dict.fromkeys(f for _, f in FAMILIES)) + ["other"]
        groups = [
            (f"{g}: {fam}", members)
            for (g, fam), members in sorted(
                keyed.items(), key=lambda kv: (_panel_rank(kv[0][0]), order.index(kv[0][1]))
            )
        ]
    else:
        fams: dict[str, list[str]] = {}
        for s in rest["statistic"]:
            fams.setdefault(statistic_family(s), []).append(s)
        order = list(dict.fromkeys(f for _, f in FAMILIES)) + ["other"]
        groups = sorted(fams.items(), key=lambda kv: order.index(kv[0]))
    panels = []
    for title, members in groups:
        parts = _chunks(sorted(members), per_panel - len(oracles))
        panels += [
            (title + (f" ({i + 1}/{len(parts)})" if len(parts) > 1 else ""), part + oracles)
            for i, part in enumerate(parts)
        ]
    return panels or [(ORACLE_FAMILY, oracles)]


def _panel_rank(group: str) -> tuple[int, str]:
    """Access levels in their order (least held first), other groups after, alphabetically."""
    from trainables.detection.context import LEVELS

    return (LEVELS.index(group), "") if group in LEVELS else (len(LEVELS), group)


def _group_of(stats: pd.DataFrame, statistic: str, panel_by: str | None) -> str:
    """The panel a statistic goes to: its ``panel_by`` value when given (oracles stay oracles), else its family."""
    oracle = bool(stats.at[statistic, "oracle"])
    if panel_by is not None and panel_by in stats.columns and not oracle:
        return str(stats.at[statistic, panel_by])
    return statistic_family(statistic, oracle)


def best_per_family(table: pd.DataFrame, panel_by: str | None = None) -> list[str]:
    """The statistic with the highest mean AUROC over theta in each family (or ``panel_by`` group;
    oracles: one, the best), chosen after seeing the data: an overview, not a detector selected in
    advance. Families in their fixed order, the oracle last."""
    score = table.groupby("statistic")["auroc"].mean().fillna(-1.0)  # never scored: ranks last
    stats = table.drop_duplicates("statistic").set_index("statistic")
    best: dict[str, str] = {}
    for s in sorted(stats.index, key=lambda s: (-score[s], s)):
        best.setdefault(_group_of(stats, s, panel_by), s)
    order = list(dict.fromkeys(f for _, f in FAMILIES)) + ["other"]
    return [
        best[g]
        for g in sorted(best, key=lambda g: (g == ORACLE_FAMILY, order.index(g) if g in order else 99, _panel_rank(g)))
    ]


def _cell_title(cell: dict[str, Any]) -> str:
    return ", ".join(title_label(k, v) for k, v in cell.items())


def _detection_axes(
    ax_auc,
    ax_roc,
    g: pd.DataFrame,
    df: pd.DataFrame,
    stats: Sequence[str],
    cell: dict[str, Any],
    thetas: list[float],
    labels: dict[str, str] | None = None,
) -> None:
    """AUROC vs theta (categorical: one tick per theta, so one theta is a readable axis) with 95%
    intervals, and the ROC curves at the largest theta; one style per statistic, oracles dashed and
    hollow; the legend, outside the ROC panel, names each statistic with its AUROC at the largest theta."""
    from .detect import roc_points

    pos = {t: i for i, t in enumerate(thetas)}
    tmax = thetas[-1]
    plain = [s for s in stats if not bool(g.loc[g["statistic"] == s, "oracle"].iloc[0])]
    handles = []
    for k, s in enumerate(stats):
        part = g[g["statistic"] == s].sort_values("theta")
        oracle = s not in plain
        color, marker = ORACLE_STYLES[(k - len(plain)) % 2] if oracle else STYLES[k % len(STYLES)]
        style = {
            "color": color,
            "marker": marker,
            "ls": "--" if oracle else "-",
            "lw": 1.4,
            "ms": 6,
            "mfc": "white" if oracle else color,
            "mew": 1.4,
        }
        # spread the statistics a little around each tick so their intervals do not hide each other
        dx = (k - (len(stats) - 1) / 2) * min(0.07, 0.5 / max(len(stats), 1))
        xs = np.array([pos[t] for t in part["theta"]], dtype=float) + dx
        err = np.vstack(
            [(part["auroc"] - part["auroc_lo"]).clip(lower=0), (part["auroc_hi"] - part["auroc"]).clip(lower=0)]
        )
        ax_auc.errorbar(xs, part["auroc"], yerr=err, capsize=2, elinewidth=1, **style)
        f, t = roc_points(df, s, tmax, cell)
        ax_roc.plot(f, t, color=color, ls=style["ls"], lw=1.6, alpha=0.9)
        at = part[part["theta"] == tmax]
        auc = (
            f"{at['auroc'].iloc[0]:.2f} [{at['auroc_lo'].iloc[0]:.2f}, {at['auroc_hi'].iloc[0]:.2f}]"
            if len(at)
            else "–"
        )
        name = (labels or {}).get(s, s) + (" (oracle)" if oracle else "")
        handles.append(Line2D([], [], **style, label=f"{name}: {auc}"))
    for level, text in ((0.9, "0.9"), (0.5, "chance")):
        ax_auc.axhline(level, ls=":", color="0.6" if level == 0.9 else "0.8", lw=1, zorder=0)
        ax_auc.annotate(
            text,
            (1.0, level),
            xycoords=("axes fraction", "data"),
            xytext=(2, 0),
            textcoords="offset points",
            fontsize=6,
            color="0.45",
            va="center",
        )
    ax_auc.set_xticks(range(len(thetas)), [f"{t:g}" for t in thetas])
    ax_auc.set_xlim(-0.5, len(thetas) - 0.5)
    ax_auc.set_ylim(-0.02, 1.04)
    ax_auc.set_xlabel("poison fraction θ")
    ax_auc.set_ylabel("AUROC, 95% CI")
    ax_roc.plot([0, 1], [0, 1], color="0.85", lw=1, zorder=0)
    ax_roc.set_xlim(-0.02, 1.02)
    ax_roc.set_ylim(-0.02, 1.02)
    ax_roc.set_aspect("equal")
    ax_roc.set_xlabel("false-positive rate")
    ax_roc.set_ylabel("true-positive rate")
    ax_roc.set_title(f"ROC at θ = {tmax:g}", fontsize=9)
    ax_roc.legend(
        handles=handles,
        fontsize=7,
        title=f"AUROC [95% CI] at θ = {tmax:g}",
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.04, 1.0),
        borderaxespad=0,
    )


def plot_detection(
    table: pd.DataFrame, df: pd.DataFrame, out: Path, panel_by: str | None = None, per_panel: int = 6
) -> list[Path]:
    """Per cell of defence settings, two figures.

    ``detection_<cell>``: the attack (ASR and clean accuracy vs theta) beside the best statistic of
    each family (highest mean AUROC over theta, picked after the fact, and so named in the title)
    with the oracle: AUROC vs theta and the ROC curves at the largest theta.
    ``detection_<cell>_all``: every statistic, one row per family (``panel_by``: a column of
    ``table`` to group by instead, e.g. an access level), at most ``per_panel`` lines a panel with the
    oracles repeated in each as the reference.
    """
    from .detect import cell_fields

    cells = cell_fields(table)
    paths = []
    groups = table.groupby(cells, dropna=False, sort=True) if cells else [((), table)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        cell = dict(zip(cells, key, strict=True))
        tag = file_tag(cell)
        thetas = sorted(float(t) for t in g["theta"].unique())
        counts = g.drop_duplicates("theta")
        n_text = (
            f"{int(counts['n_poisoned'].max())} poisoned vs {int(counts['n_clean'].max())} clean models per θ"
            if {"n_poisoned", "n_clean"} <= set(counts.columns)
            else ""
        )
        head = "Detection over model populations" + (f" — {_cell_title(cell)}" if cell else "")
        # the overview: attack | best per family (AUROC vs theta) | their ROC curves
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), layout="constrained", width_ratios=[1, 1.15, 1])
        first = counts.sort_values("theta")
        xs = [thetas.index(float(t)) for t in first["theta"]]
        axes[0].plot(xs, first["asr"], marker="o", color="C3", lw=1.6, label="ASR (mean over models)")
        axes[0].plot(xs, first["clean_acc"], marker="s", color="0.5", lw=1.2, label="clean accuracy")
        axes[0].axhline(0.5, ls=":", color="0.7", lw=1)
        axes[0].set_xticks(range(len(thetas)), [f"{t:g}" for t in thetas])
        axes[0].set_xlim(-0.5, len(thetas) - 0.5)
        axes[0].set_ylim(-0.02, 1.04)
        axes[0].set_xlabel("poison fraction θ")
        axes[0].set_title("the attack", fontsize=9)
        axes[0].legend(fontsize=7, loc="lower right")
        best = best_per_family(g, panel_by)
        stats = g.drop_duplicates("statistic").set_index("statistic")
        labels = {s: s if bool(stats.at[s, "oracle"]) else f"{s} [{_group_of(stats, s, panel_by)}]" for s in best}
        _detection_axes(axes[1], axes[2], g, df, best, cell, thetas, labels)
        group = "access level" if panel_by == "access" else (panel_by or "family")
        axes[1].set_title(f"best statistic per {group} (by mean AUROC over θ, picked after the fact)", fontsize=9)
        fig.suptitle(head + (f"\n{n_text}" if n_text else ""), fontsize=10)
        paths += save_figure(fig, out, f"detection{'_' + tag if tag else ''}")
        # every statistic, a row per family
        panels = detection_panels(g, panel_by, per_panel)
        fig, axes = plt.subplots(
            len(panels),
            2,
            figsize=(12.5, 3.6 * len(panels)),
            layout="constrained",
            squeeze=False,
            width_ratios=[1.3, 1],
        )
        for (title, members), (ax_auc, ax_roc) in zip(panels, axes, strict=True):
            _detection_axes(ax_auc, ax_roc, g, df, members, cell, thetas)
            ax_auc.set_title(title, fontsize=9, loc="left", fontweight="bold")
        fig.suptitle(head + " — every statistic" + (f"\n{n_text}" if n_text else ""), fontsize=10)
        paths += save_figure(fig, out, f"detection{'_' + tag if tag else ''}_all")
    return paths


# --------------------------------------------------------------------------- localisation maps
def localisation_models(df: pd.DataFrame, limit: int = 8) -> list[pd.Series]:
    """The models whose localisation maps a report shows: per cell of defence settings, the clean model
    (the smallest theta) and the most poisoned one (the largest), lowest seed first; at most ``limit``."""
    from .detect import defence_fields

    ok = completed(df)
    if ok.empty or "theta" not in ok.columns:
        return []
    cells = defence_fields(ok)
    picked = []
    for _, g in ok.groupby(cells, sort=True, dropna=False) if cells else [((), ok)]:
        g = g.sort_values([c for c in ("seed",) if c in g.columns] or ["theta"])
        for theta in sorted({float(g["theta"].min()), float(g["theta"].max())}):
            picked.append(g[g["theta"] == theta].iloc[0])
    return picked[:limit]


def pixel_energy(vectors: np.ndarray) -> np.ndarray:
    """(k, C, H, W) eigenvectors -> (k, H, W) per-pixel energy (squares summed over channels), each map
    summing to 1, as the trial's localisation statistics compute it; all-zero vectors (padding of a
    rank-limited spectrum) are dropped."""
    v = np.asarray(vectors, dtype=np.float64)
    e = (v**2).sum(1)
    total = e.sum((1, 2))
    keep = total > 0
    return e[keep] / total[keep, None, None]


def plot_localisation(
    df: pd.DataFrame, load: Callable[[pd.Series], np.ndarray | None], out: Path, limit: int = 8
) -> list[Path]:
    """Per model of :func:`localisation_models` (only in sweeps that ran the localisation statistics):
    the per-pixel energy of each top eigenvector on one colour scale with its colorbar, the IPR over
    each map and the model (theta, kappa, seed...) in the title; ``localisation_theta0.1_kappa0``."""
    from .detect import defence_fields

    ok = completed(df)
    if "det_ipr_1" not in ok.columns or not ok["det_ipr_1"].notna().any():
        return []
    cells = defence_fields(ok)
    paths = []
    for row in localisation_models(ok, limit):
        vecs = load(row)
        if vecs is None:
            continue
        energy = pixel_energy(vecs)
        if len(energy) == 0:
            continue
        ipr = (energy**2).sum((1, 2))
        k, (h, w) = len(energy), energy.shape[1:]
        fig, axes = plt.subplots(1, k, figsize=(1.9 * k + 1.2, 2.9), layout="constrained", squeeze=False)
        vmax = float(energy.max())
        for j, ax in enumerate(axes[0]):
            im = ax.imshow(energy[j], cmap="magma", vmin=0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"v{j + 1}\nIPR {ipr[j]:.3f}", fontsize=8)
        fig.colorbar(
            im,
            ax=axes[0].tolist(),
            shrink=0.85,
            pad=0.02,
            label=f"energy share per pixel\n(uniform: 1/{h * w} = {1 / (h * w):.3g})",
        )
        fields = ["theta", "kappa", *[c for c in cells if c not in ("theta", "kappa")], "seed"]
        model = {c: row[c] for c in fields if c in row.index and not is_nan(row[c])}
        name = ", ".join(title_label(c, v) for c, v in model.items())
        trial = f" (trial {row['trial_id']})" if isinstance(row.get("trial_id"), str) and row["trial_id"] else ""
        fig.suptitle(f"Where the top input-Hessian eigenvectors put their energy — {name}{trial}", fontsize=9)
        label = file_tag({c: v for c, v in model.items() if c != "seed"})
        paths += save_figure(fig, out, f"localisation_{label}")
    return paths
