"""The paper's figures and tables for any sweep (matplotlib, PNG and SVG).

* ASR vs theta per kappa with a clean-accuracy inset (Figs 6, 7, 9);
* overlap^2 and max-overlap^2 vs theta per kappa (Figs 6, 9, 13);
* top-eigenvector images across (theta, kappa) (Fig 8);
* the safety-efficacy frontier (:mod:`analysis.frontier_plot`);
* Table 1 (accuracy / ASR per epochs x kappa) and Table 2 (max overlap and its index);
* the detectability lag per kappa: the smallest theta with ASR >= 0.5 against the smallest theta
  whose overlap^2 exceeds the clean (theta = 0) models' mean + 3 sigma;
* detection over model populations and localisation maps (:mod:`analysis.detection_plots`).

Seeds are averaged (mean, with std error bars) before plotting. Every figure is written as PNG and
SVG; file names carry no ``=`` (``localisation_theta0.05_kappa0.png``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from .results import completed  # noqa: E402

FORMATS = ("png", "svg")
DPI = 120


def save_figure(fig, out: Path, stem: str) -> list[Path]:
    """Save ``fig`` as PNG and SVG into ``out`` and close it; returns the paths.

    The layout and the tight bounding box are computed once, then each format is one drawing pass.
    ``savefig(bbox_inches="tight")`` lays the figure out and measures it again for every format: the text
    layout that dominates ``report``, done twice over. Measured: ``sweeper report`` of an 8-model detection
    sweep (13 figures) 12.8 s -> 10.9 s, the PNGs pixel-identical. The box is the one ``"tight"`` gives
    (``savefig.pad_inches`` around it).
    """
    out.mkdir(parents=True, exist_ok=True)
    fig.set_dpi(DPI)  # lay out at the raster's dpi, as savefig(dpi=...) would
    fig.draw_without_rendering()  # runs the layout engine, if any
    bbox = fig.get_tightbbox().padded(plt.rcParams["savefig.pad_inches"])
    fig.set_layout_engine(None)  # the layout is done: savefig would lay it out (and measure it) again
    paths = []
    for fmt in FORMATS:
        p = out / f"{stem}.{fmt}"
        fig.savefig(p, dpi=DPI, bbox_inches=bbox)
        paths.append(p)
    plt.close(fig)
    return paths


def _facets(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """One panel set per (augment, epochs, trigger, poison_mode) combination present."""
    keys = [
        k
        for k in ("augment", "epochs", "trigger", "poison_mode", "dataset", "model")
        if k in df.columns and df[k].nunique() > 1
    ]
    if not keys:
        return [("", df)]
    return [
        ("_".join(f"{k}-{v}" for k, v in zip(keys, vals if isinstance(vals, tuple) else (vals,), strict=True)), g)
        for vals, g in df.groupby(keys, sort=True)
    ]


def _mean_std(df: pd.DataFrame, x: str, group: str, y: str) -> pd.DataFrame:
    """Mean and std of ``y`` per (group, x); a frame without ``group`` (a linear-trial sweep has no
    kappa) is one group."""
    if group not in df.columns:
        df = df.assign(**{group: math.nan})
    return df.groupby([group, x], dropna=False)[y].agg(["mean", "std"]).reset_index()


def _line_label(group: str, value) -> str:
    return (
        f"{'κ' if group == 'kappa' else group}={value:g}" if isinstance(value, float) and not math.isnan(value) else ""
    )


def has_columns(df: pd.DataFrame, *cols: str) -> bool:
    return not df.empty and all(c in df.columns for c in cols)


def plot_asr_vs_theta(df: pd.DataFrame, out: Path) -> list[Path]:
    """ASR vs theta, a line per kappa, clean accuracy in an inset (Figs 6, 7, 9)."""
    paths = []
    for tag, g in _facets(completed(df)):
        if not has_columns(g, "theta", "asr", "clean_acc"):
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        inset = ax.inset_axes([0.58, 0.1, 0.38, 0.33])
        for kappa, part in _mean_std(g, "theta", "kappa", "asr").groupby("kappa", dropna=False):
            ax.errorbar(
                part["theta"],
                part["mean"],
                yerr=part["std"].fillna(0),
                marker="o",
                capsize=2,
                label=_line_label("kappa", kappa) or None,
            )
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
        if not has_columns(g, "theta", "overlap_sq", "max_overlap_sq"):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
        for ax, metric, title in (
            (axes[0], "overlap_sq", "cos²(v₁, trigger)"),
            (axes[1], "max_overlap_sq", "maxₖ cos²(vₖ, trigger)"),
        ):
            for kappa, part in _mean_std(g, "theta", "kappa", metric).groupby("kappa", dropna=False):
                ax.errorbar(
                    part["theta"],
                    part["mean"],
                    yerr=part["std"].fillna(0),
                    marker="o",
                    capsize=2,
                    label=_line_label("kappa", kappa) or None,
                )
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
        if not has_columns(g, "theta", "kappa"):
            continue
        g = g.sort_values("seed").drop_duplicates(["theta", "kappa"]) if "seed" in g.columns else g
        thetas, kappas = sorted(g["theta"].unique()), sorted(g["kappa"].unique())
        if not thetas:
            continue
        fig, axes = plt.subplots(
            len(kappas), len(thetas), figsize=(1.6 * len(thetas) + 0.8, 1.6 * len(kappas) + 0.4), squeeze=False
        )
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


def plot_metric_vs(
    df: pd.DataFrame, out: Path, x: str, metrics: Sequence[str], hue: str | None, stem: str, logx: bool = False
) -> list[Path]:
    """One panel per metric against ``x``, a line per ``hue`` value (seeds averaged, std as error bars)."""
    ok = completed(df)
    metrics = [m for m in metrics if m in ok.columns]
    if not metrics or not has_columns(ok, x):
        return []
    hue = hue if hue in ok.columns else None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.5), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for value, part in _mean_std(ok, x, hue or "_all", m).groupby(hue or "_all", dropna=False):
            ax.errorbar(
                part[x],
                part["mean"],
                yerr=part["std"].fillna(0),
                marker="o",
                capsize=2,
                label=_line_label(hue, value) if hue else None,
            )
        ax.set_xlabel(x)
        ax.set_title(m, fontsize=9)
        if logx:
            ax.set_xscale("symlog", linthresh=1)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
    return save_figure(fig, out, stem)


# --------------------------------------------------------------------------- names, labels, file tags
GREEK = {"kappa": "κ", "theta": "θ", "blend_alpha": "blend α", "lam": "λ", "ell": "ℓ", "zeta_dist": "ζ distance"}


def _num(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_)


def short_label(field: str, value: Any) -> str:
    """A config value as a point label: ``κ=400``, ``aug`` / ``no-aug``, ``15 ep``, ``trigger=square``."""
    if field == "augment" and isinstance(value, bool | np.bool_):
        return "aug" if value else "no-aug"
    if field == "epochs" and _num(value):
        return f"{int(value)} ep"
    if field == "defence_family":
        return str(value)
    name = GREEK.get(field, field)
    return f"{name}={value:g}" if _num(value) else f"{name}={value}"


def title_label(field: str, value: Any) -> str:
    """A config value as a title reads: ``κ = 400``, ``augmentation on``, ``15 epochs``, ``seed 0``."""
    if field == "augment" and isinstance(value, bool | np.bool_):
        return f"augmentation {'on' if value else 'off'}"
    if field == "epochs" and _num(value):
        return f"{int(value)} epochs"
    if field == "seed" and _num(value):
        return f"seed {int(value)}"
    name = GREEK.get(field, field)
    return f"{name} = {value:g}" if _num(value) else f"{name} = {value}"


def file_tag(values: dict[str, Any]) -> str:
    """Config values as a file-name part without ``=`` or spaces: ``theta0.05_kappa0``, ``noaug``, ``trigger-square``."""
    parts = []
    for k, v in values.items():
        if k == "augment" and isinstance(v, bool | np.bool_):
            parts.append("aug" if v else "noaug")
        elif _num(v):
            parts.append(f"{k}{v:g}")
        else:
            parts.append(f"{k}-{v}")
    # shells and browsers read '=', spaces and slashes specially in paths and URLs
    return re.sub(r"[^A-Za-z0-9.+_-]", "-", "_".join(parts))


def label_fields(df: pd.DataFrame, exclude: Sequence[str]) -> list[str]:
    """The config fields that tell the trials of ``df`` apart (a label needs nothing else), seed and ``exclude`` aside."""
    from .results import CONFIG_FIELDS

    preferred = ["defence_family", "kappa", "augment", "epochs"]
    fields = [c for c in preferred + [c for c in CONFIG_FIELDS if c not in preferred] if c in df.columns]
    varying = [c for c in fields if c not in exclude and c != "seed" and df[c].astype(str).nunique() > 1]
    return varying or [c for c in ("kappa",) if c in df.columns and c not in exclude]


def point_label(row: pd.Series, fields: Sequence[str] = ("kappa", "augment", "epochs")) -> str:
    return " ".join(short_label(f, row[f]) for f in fields if f in row.index and not is_nan(row[f]))


def is_nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def table1(df: pd.DataFrame, theta: float | None = None) -> pd.DataFrame:
    """Accuracy and ASR (%) per epochs (rows) x kappa (columns) at one theta (default: the largest), as Table 1."""
    ok = completed(df)
    if not has_columns(ok, "theta", "epochs", "kappa", "clean_acc", "asr"):
        return pd.DataFrame()
    theta = float(ok["theta"].max()) if theta is None else theta
    g = ok[np.isclose(ok["theta"], theta)]
    t = g.groupby(["epochs", "kappa"])[["clean_acc", "asr"]].mean().mul(100).round(2).unstack("kappa")
    t.columns = [f"κ={k:g} {'Acc' if m == 'clean_acc' else 'ASR'}" for m, k in t.columns]
    return t.reset_index()


def table2(df: pd.DataFrame) -> pd.DataFrame:
    """max overlap^2 and the eigenvector index where it occurs, per kappa and theta (Table 2).

    With several seeds per cell: overlap^2 is their mean (``max_overlap_sq_std``: the sample std, ddof 1),
    the index is the one most seeds share — ties go to the lowest index, the top of the spectrum — and
    ``index_seeds`` says how many seeds share it (``3/5``).
    """
    ok = completed(df)
    cols = [c for c in ("kappa", "theta", "max_overlap_sq", "max_overlap_index") if c in ok.columns]
    if not has_columns(ok, "kappa", "theta", "max_overlap_sq", "max_overlap_index"):
        return pd.DataFrame(columns=cols)
    rows = []
    for (kappa, theta), g in ok.groupby(["kappa", "theta"]):
        counts = g["max_overlap_index"].astype(int).value_counts()
        top = int(counts.max())
        row = {
            "kappa": kappa,
            "theta": theta,
            "max_overlap_sq": g["max_overlap_sq"].mean(),
            "max_overlap_index": int(min(counts[counts == top].index)),
        }
        if len(g) > 1:
            row.update(max_overlap_sq_std=g["max_overlap_sq"].std(), index_seeds=f"{top}/{len(g)}")
        rows.append(row)
    return pd.DataFrame(rows)


def detectability_lag(
    df: pd.DataFrame, asr_level: float = 0.5, sigmas: float = 3.0, metric: str = "overlap_sq"
) -> pd.DataFrame:
    """Per kappa: theta_asr (smallest theta with mean ASR >= asr_level), theta_visible (smallest theta > 0
    whose mean overlap^2 exceeds the theta = 0 models' mean + sigmas x std, same kappa), lag = visible - asr.

    With a single clean model per kappa the std is 0 and the threshold is its overlap^2; without any
    theta = 0 model the clean models of all kappas are pooled. NaN where a level is never reached.
    """
    ok = completed(df)
    rows = []
    if not has_columns(ok, metric, "theta", "kappa", "asr"):
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
        rows.append(
            {"kappa": kappa, "theta_asr": t_asr, "theta_visible": t_vis, "lag": t_vis - t_asr, "threshold": threshold}
        )
    return pd.DataFrame(rows)


def plot_lag(lag: pd.DataFrame, out: Path) -> list[Path]:
    """theta needed for ASR >= 0.5 and theta needed for spectral visibility, per kappa, on one tick each;
    a level never reached within the sweep is an open triangle at the top edge."""
    lag = lag.reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(lag) + 2.5), 4.6), layout="constrained")
    x = np.arange(len(lag), dtype=float)
    finite = pd.concat([lag["theta_asr"], lag["theta_visible"]]).dropna()
    top = float(finite.max()) * 1.15 if len(finite) and finite.max() > 0 else 1.0
    styles = {
        "theta_asr": {"marker": "o", "color": "C3", "ms": 9, "label": "θ where ASR ≥ 0.5"},
        "theta_visible": {
            "marker": "s",
            "color": "C0",
            "ms": 7,
            "mfc": "none",
            "mew": 2,
            "label": "θ where overlap² > clean mean + 3σ",
        },
    }
    for col, st in styles.items():
        st = {k: v for k, v in st.items() if k != "label"}
        vals = lag[col].to_numpy(dtype=float)
        ax.plot(x, vals, ls="none", **st, zorder=3)  # same x as the tick: both levels of one κ on its tick
        missing = np.isnan(vals)
        ax.plot(
            x[missing],
            np.full(missing.sum(), top),
            ls="none",
            marker="^",
            color=st["color"],
            ms=8,
            mfc="none",
            zorder=3,
        )
    for i, row in lag.iterrows():
        if not (math.isnan(row["theta_asr"]) or math.isnan(row["theta_visible"])):
            ax.plot([i, i], [row["theta_asr"], row["theta_visible"]], color="0.6", lw=1.5, zorder=2)
    ax.set_xticks(x, [title_label("kappa", k) for k in lag["kappa"]], fontsize=8)
    ax.set_xlim(-0.6, len(lag) - 0.4)
    ax.set_ylim(0, top * 1.08)
    ax.set_ylabel("poison fraction θ")
    ax.set_title("detectability lag: the attack works at ●, the trigger shows at □", fontsize=9)
    # explicit handles: every entry shows its marker even when no point of that kind was drawn
    handles = [
        Line2D([], [], ls="none", **{k: v for k, v in st.items() if k != "label"}, label=st["label"])
        for st in styles.values()
    ]
    handles.append(
        Line2D(
            [],
            [],
            ls="none",
            marker="^",
            color="0.3",
            mfc="none",
            ms=8,
            label="not reached within the sweep (level's colour)",
        )
    )
    handles.append(Line2D([], [], color="0.6", lw=1.5, label="lag"))
    # below the axes, outside the data: the κ ticks may be few and the plot narrow
    fig.legend(handles=handles, fontsize=7, loc="outside lower center", ncol=2)
    return save_figure(fig, out, "detectability_lag")
