"""The paper's figures and tables for any sweep (matplotlib, PNG and SVG).

* ASR vs theta per kappa with a clean-accuracy inset (Figs 6, 7, 9);
* overlap^2 and max-overlap^2 vs theta per kappa (Figs 6, 9, 13);
* top-eigenvector images across (theta, kappa) (Fig 8);
* the safety-efficacy frontier, frontier points joined and labelled;
* Table 1 (accuracy / ASR per epochs x kappa) and Table 2 (max overlap and its index);
* the detectability lag per kappa: the smallest theta with ASR >= 0.5 against the smallest theta
  whose overlap^2 exceeds the clean (theta = 0) models' mean + 3 sigma.

Seeds are averaged (mean, with std error bars) before plotting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .pareto import DEFAULT_OBJECTIVES, frontier  # noqa: E402
from .results import completed  # noqa: E402

FORMATS = ("png", "svg")


def save_figure(fig, out: Path, stem: str) -> list[Path]:
    """Save ``fig`` as PNG and SVG into ``out`` and close it; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        p = out / f"{stem}.{fmt}"
        fig.savefig(p, dpi=120, bbox_inches="tight")
        paths.append(p)
    plt.close(fig)
    return paths


def _facets(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """One panel set per (augment, epochs, trigger, poison_mode) combination present."""
    keys = [k for k in ("augment", "epochs", "trigger", "poison_mode", "dataset", "model")
            if k in df.columns and df[k].nunique() > 1]
    if not keys:
        return [("", df)]
    return [("_".join(f"{k}-{v}" for k, v in zip(keys, vals if isinstance(vals, tuple) else (vals,), strict=True)), g)
            for vals, g in df.groupby(keys, sort=True)]


def _mean_std(df: pd.DataFrame, x: str, group: str, y: str) -> pd.DataFrame:
    """Mean and std of ``y`` per (group, x); a frame without ``group`` (a linear-trial sweep has no
    kappa) is one group."""
    if group not in df.columns:
        df = df.assign(**{group: math.nan})
    return df.groupby([group, x], dropna=False)[y].agg(["mean", "std"]).reset_index()


def _line_label(group: str, value) -> str:
    return f"{'κ' if group == 'kappa' else group}={value:g}" if isinstance(value, float) and not math.isnan(value) else ""


def _has(df: pd.DataFrame, *cols: str) -> bool:
    return not df.empty and all(c in df.columns for c in cols)


def plot_asr_vs_theta(df: pd.DataFrame, out: Path) -> list[Path]:
    """ASR vs theta, a line per kappa, clean accuracy in an inset (Figs 6, 7, 9)."""
    paths = []
    for tag, g in _facets(completed(df)):
        if not _has(g, "theta", "asr", "clean_acc"):
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        inset = ax.inset_axes([0.58, 0.1, 0.38, 0.33])
        for kappa, part in _mean_std(g, "theta", "kappa", "asr").groupby("kappa", dropna=False):
            ax.errorbar(part["theta"], part["mean"], yerr=part["std"].fillna(0), marker="o", capsize=2,
                        label=_line_label("kappa", kappa) or None)
        for _, part in _mean_std(g, "theta", "kappa", "clean_acc").groupby("kappa", dropna=False):
            inset.plot(part["theta"], part["mean"], marker=".", lw=1)
        ax.set_xlabel("poison fraction θ")
        ax.set_ylabel("attack success rate")
        ax.set_ylim(-0.02, 1.02)
        inset.set_title("clean acc.", fontsize=7)
        inset.tick_params(labelsize=6)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7, loc="upper left")
        ax.set_title(f"ASR vs θ {tag}".strip(), fontsize=9)
        paths += save_figure(fig, out, f"asr_vs_theta{'_' + tag if tag else ''}")
    return paths


def plot_overlap_vs_theta(df: pd.DataFrame, out: Path) -> list[Path]:
    """overlap^2 of v1 and max_k overlap^2 vs theta, a line per kappa (Figs 6, 9, 13)."""
    paths = []
    for tag, g in _facets(completed(df)):
        if not _has(g, "theta", "overlap_sq", "max_overlap_sq"):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
        for ax, metric, title in ((axes[0], "overlap_sq", "cos²(v₁, trigger)"),
                                  (axes[1], "max_overlap_sq", "maxₖ cos²(vₖ, trigger)")):
            for kappa, part in _mean_std(g, "theta", "kappa", metric).groupby("kappa", dropna=False):
                ax.errorbar(part["theta"], part["mean"], yerr=part["std"].fillna(0), marker="o", capsize=2,
                            label=_line_label("kappa", kappa) or None)
            ax.set_xlabel("poison fraction θ")
            ax.set_title(title, fontsize=9)
        axes[0].set_ylabel("overlap²")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"trigger visibility in the input Hessian {tag}".strip(), fontsize=9)
        paths += save_figure(fig, out, f"overlap_vs_theta{'_' + tag if tag else ''}")
    return paths


def plot_eigenvector_grid(df: pd.DataFrame, load: Callable[[pd.Series], np.ndarray | None], out: Path) -> list[Path]:
    """Top eigenvector v1 of each (theta, kappa) cell (first seed), rows kappa, columns theta (Fig 8)."""
    paths = []
    for tag, g in _facets(completed(df)):
        if not _has(g, "theta", "kappa"):
            continue
        g = g.sort_values("seed").drop_duplicates(["theta", "kappa"]) if "seed" in g.columns else g
        thetas, kappas = sorted(g["theta"].unique()), sorted(g["kappa"].unique())
        if not thetas:
            continue
        fig, axes = plt.subplots(len(kappas), len(thetas), figsize=(1.6 * len(thetas) + 0.8, 1.6 * len(kappas) + 0.4),
                                 squeeze=False)
        for i, k in enumerate(kappas):
            for j, t in enumerate(thetas):
                ax = axes[i, j]
                ax.set_xticks([])
                ax.set_yticks([])
                cell = g[(g["theta"] == t) & (g["kappa"] == k)]
                vecs = load(cell.iloc[0]) if len(cell) else None
                if vecs is not None:
                    img = vecs[0].mean(0) if vecs[0].shape[0] > 1 else vecs[0][0]
                    lim = float(np.abs(img).max()) or 1.0
                    ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim)
                    if "overlap_sq" in cell.columns:
                        ax.set_xlabel(f"cos²={cell.iloc[0]['overlap_sq']:.2f}", fontsize=6)
                if i == 0:
                    ax.set_title(f"θ={t:g}", fontsize=7)
                if j == 0:
                    ax.set_ylabel(f"κ={k:g}", fontsize=7)
        fig.suptitle(f"top input-Hessian eigenvector v₁ {tag}".strip(), fontsize=9)
        paths += save_figure(fig, out, f"eigenvectors{'_' + tag if tag else ''}")
    return paths


def _label(row: pd.Series) -> str:
    parts = [f"κ={row['kappa']:g}"] if isinstance(row.get("kappa"), float) and not math.isnan(row["kappa"]) else []
    if isinstance(row.get("augment"), bool | np.bool_):
        parts.append("aug" if row["augment"] else "no-aug")
    if isinstance(row.get("epochs"), int | float | np.integer) and not pd.isna(row["epochs"]):
        parts.append(f"{int(row['epochs'])}ep")
    return " ".join(parts)


def plot_metric_vs(df: pd.DataFrame, out: Path, x: str, metrics: Sequence[str], hue: str | None,
                   stem: str, logx: bool = False) -> list[Path]:
    """One panel per metric against ``x``, a line per ``hue`` value (seeds averaged, std as error bars)."""
    ok = completed(df)
    metrics = [m for m in metrics if m in ok.columns]
    if not metrics or not _has(ok, x):
        return []
    hue = hue if hue in ok.columns else None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.5), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for value, part in _mean_std(ok, x, hue or "_all", m).groupby(hue or "_all", dropna=False):
            ax.errorbar(part[x], part["mean"], yerr=part["std"].fillna(0), marker="o", capsize=2,
                        label=_line_label(hue, value) if hue else None)
        ax.set_xlabel(x)
        ax.set_title(m, fontsize=9)
        if logx:
            ax.set_xscale("symlog", linthresh=1)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
    return save_figure(fig, out, stem)


def plot_frontier(df: pd.DataFrame, out: Path, objectives: Sequence[tuple[str, str]] = DEFAULT_OBJECTIVES,
                  group_by: Sequence[str] | None = ("theta",), name: str = "frontier",
                  title: str = "safety–efficacy frontier") -> list[Path]:
    """All trials and the frontier per group (default per theta), joined and labelled by kappa / aug / epochs."""
    ok = completed(df)
    (x, _), (y, _) = objectives[0], objectives[1]
    group_by = [c for c in (group_by or []) if c in ok.columns]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(ok[y], ok[x], color="0.8", s=18, label="all trials", zorder=1)
    front = frontier(ok, objectives, group_by or None)
    groups = front.groupby(group_by, sort=True) if group_by else [("", front)]
    for key, g in groups:
        g = g.sort_values(y)
        legend = ", ".join(f"{c}={v:g}" if isinstance(v, float) else f"{c}={v}"
                           for c, v in zip(group_by, key if isinstance(key, tuple) else (key,), strict=False))
        ax.plot(g[y], g[x], marker="o", zorder=2, label=legend or "frontier")
        for _, row in g.iterrows():
            ax.annotate(_label(row), (row[y], row[x]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{y} ({dict(objectives)[y]})")
    ax.set_ylabel(f"{x} ({dict(objectives)[x]})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, out, name)


def table1(df: pd.DataFrame, theta: float | None = None) -> pd.DataFrame:
    """Accuracy and ASR (%) per epochs (rows) x kappa (columns) at one theta (default: the largest), as Table 1."""
    ok = completed(df)
    if not _has(ok, "theta", "epochs", "kappa", "clean_acc", "asr"):
        return pd.DataFrame()
    theta = float(ok["theta"].max()) if theta is None else theta
    g = ok[np.isclose(ok["theta"], theta)]
    t = g.groupby(["epochs", "kappa"])[["clean_acc", "asr"]].mean().mul(100).round(2).unstack("kappa")
    t.columns = [f"κ={k:g} {'Acc' if m == 'clean_acc' else 'ASR'}" for m, k in t.columns]
    return t.reset_index()


def table2(df: pd.DataFrame) -> pd.DataFrame:
    """max overlap^2 and the eigenvector index where it occurs, per kappa and theta (Table 2)."""
    ok = completed(df)
    cols = [c for c in ("kappa", "theta", "max_overlap_sq", "max_overlap_index") if c in ok.columns]
    if not _has(ok, "kappa", "theta", "max_overlap_sq", "max_overlap_index"):
        return pd.DataFrame(columns=cols)
    return ok.groupby(["kappa", "theta"])[["max_overlap_sq", "max_overlap_index"]].agg(
        {"max_overlap_sq": "mean", "max_overlap_index": lambda s: int(s.mode().iloc[0])}).reset_index()


def detectability_lag(df: pd.DataFrame, asr_level: float = 0.5, sigmas: float = 3.0,
                      metric: str = "overlap_sq") -> pd.DataFrame:
    """Per kappa: theta_asr (smallest theta with mean ASR >= asr_level), theta_visible (smallest theta > 0
    whose mean overlap^2 exceeds the theta = 0 models' mean + sigmas x std, same kappa), lag = visible - asr.

    With a single clean model per kappa the std is 0 and the threshold is its overlap^2; without any
    theta = 0 model the clean models of all kappas are pooled. NaN where a level is never reached.
    """
    ok = completed(df)
    rows = []
    if not _has(ok, metric, "theta", "kappa", "asr"):
        return pd.DataFrame(columns=["kappa", "theta_asr", "theta_visible", "lag", "threshold"])
    pooled = ok[ok["theta"] == 0][metric]
    for kappa, g in ok.groupby("kappa", sort=True):
        clean = g[g["theta"] == 0][metric]
        ref = clean if len(clean) else pooled
        threshold = float(ref.mean() + sigmas * (ref.std(ddof=1) if len(ref) > 1 else 0.0)) if len(ref) else math.nan
        means = g.groupby("theta")[["asr", metric]].mean().sort_index()
        hit = means.index[means["asr"] >= asr_level]
        vis = means.index[(means.index > 0) & (means[metric] > threshold)] if not math.isnan(threshold) else []
        t_asr = float(hit[0]) if len(hit) else math.nan
        t_vis = float(vis[0]) if len(vis) else math.nan
        rows.append({"kappa": kappa, "theta_asr": t_asr, "theta_visible": t_vis, "lag": t_vis - t_asr,
                     "threshold": threshold})
    return pd.DataFrame(rows)


def plot_lag(lag: pd.DataFrame, out: Path) -> list[Path]:
    """theta needed for ASR >= 0.5 against theta needed for spectral visibility, per kappa."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    x = np.arange(len(lag))
    ax.scatter(x - 0.1, lag["theta_asr"], marker="o", label="θ: ASR ≥ 0.5")
    ax.scatter(x + 0.1, lag["theta_visible"], marker="s", label="θ: overlap² > clean + 3σ")
    for i, row in lag.reset_index(drop=True).iterrows():
        if not (math.isnan(row["theta_asr"]) or math.isnan(row["theta_visible"])):
            ax.plot([i - 0.1, i + 0.1], [row["theta_asr"], row["theta_visible"]], color="0.6", lw=1)
    ax.set_xticks(x, [f"κ={k:g}" for k in lag["kappa"]], fontsize=7)
    ax.set_ylabel("poison fraction θ")
    ax.set_title("detectability lag (NaN: level never reached)", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, out, "detectability_lag")


def plot_detection(table: pd.DataFrame, df: pd.DataFrame, out: Path) -> list[Path]:
    """Per cell of defence settings: ASR vs theta beside AUROC vs theta per statistic (95% bootstrap
    bands; oracles dashed), and the ROC curves at the largest theta — the detectability lag made visible."""
    from .detect import cell_fields, roc_points

    cells = cell_fields(table)
    paths = []
    groups = table.groupby(cells, dropna=False, sort=True) if cells else [((), table)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        cell = dict(zip(cells, key, strict=True))
        tag = "_".join(f"{k}-{v:g}" if isinstance(v, float) else f"{k}-{v}" for k, v in cell.items())
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        first = g.drop_duplicates("theta").sort_values("theta")
        axes[0].plot(first["theta"], first["asr"], marker="o", color="k", label="ASR")
        axes[0].plot(first["theta"], first["clean_acc"], marker=".", color="0.6", label="clean acc.")
        axes[0].axhline(0.5, ls=":", color="0.7")
        axes[0].set_xlabel("poison fraction θ")
        axes[0].set_ylim(-0.02, 1.02)
        axes[0].legend(fontsize=7)
        axes[0].set_title("attack", fontsize=9)
        tmax = float(g["theta"].max())
        for stat, part in g.groupby("statistic", sort=True):
            part = part.sort_values("theta")
            oracle = bool(part["oracle"].iloc[0])
            line, = axes[1].plot(part["theta"], part["auroc"], marker="o", ls="--" if oracle else "-",
                                 label=stat + (" (oracle)" if oracle else ""))
            axes[1].fill_between(part["theta"], part["auroc_lo"], part["auroc_hi"], color=line.get_color(), alpha=0.12)
            f, t = roc_points(df, stat, tmax, cell)
            axes[2].plot(f, t, ls="--" if oracle else "-", color=line.get_color())
        axes[1].axhline(0.9, ls=":", color="0.7")
        axes[1].axhline(0.5, ls=":", color="0.85")
        axes[1].set_xlabel("poison fraction θ")
        axes[1].set_ylabel("AUROC (poisoned vs clean models)")
        axes[1].set_ylim(0.0, 1.02)
        axes[1].legend(fontsize=6)
        axes[1].set_title("detection", fontsize=9)
        axes[2].plot([0, 1], [0, 1], color="0.8", lw=1)
        axes[2].set_xlabel("false-positive rate")
        axes[2].set_ylabel("true-positive rate")
        axes[2].set_title(f"ROC at θ = {tmax:g}", fontsize=9)
        fig.suptitle(f"detection over model populations {tag}".strip(), fontsize=9)
        paths += save_figure(fig, out, f"detection{'_' + tag if tag else ''}")
    return paths
