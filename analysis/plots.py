"""The paper's figures and tables for any sweep (matplotlib, PNG and SVG).

* ASR vs theta per kappa with a clean-accuracy inset (Figs 6, 7, 9);
* overlap^2 and max-overlap^2 vs theta per kappa (Figs 6, 9, 13);
* top-eigenvector images across (theta, kappa) (Fig 8);
* the safety-efficacy frontier, frontier points joined and labelled (coincident points share one
  label); seeds averaged first (mean, +-1 std error bars) when a configuration has several;
* Table 1 (accuracy / ASR per epochs x kappa) and Table 2 (max overlap and its index);
* the detectability lag per kappa: the smallest theta with ASR >= 0.5 against the smallest theta
  whose overlap^2 exceeds the clean (theta = 0) models' mean + 3 sigma;
* detection over model populations: AUROC vs theta and ROC curves, a few statistics per panel;
* localisation maps: the per-pixel energy of a model's top eigenvectors.

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

from .pareto import DEFAULT_OBJECTIVES, has_seed_replicates, seed_frontier  # noqa: E402
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
        if not _has(g, "theta", "overlap_sq", "max_overlap_sq"):
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
        if not _has(g, "theta", "kappa"):
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
    if not metrics or not _has(ok, x):
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


def _label_fields(df: pd.DataFrame, exclude: Sequence[str]) -> list[str]:
    """The config fields that tell the trials of ``df`` apart (a label needs nothing else), seed and ``exclude`` aside."""
    from .results import CONFIG_FIELDS

    preferred = ["kappa", "augment", "epochs"]
    fields = [c for c in preferred + [c for c in CONFIG_FIELDS if c not in preferred] if c in df.columns]
    varying = [c for c in fields if c not in exclude and c != "seed" and df[c].astype(str).nunique() > 1]
    return varying or [c for c in ("kappa",) if c in df.columns and c not in exclude]


def _label(row: pd.Series, fields: Sequence[str] = ("kappa", "augment", "epochs")) -> str:
    return " ".join(short_label(f, row[f]) for f in fields if f in row.index and not _isnan(row[f]))


def _isnan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def merge_coincident(
    x: Sequence[float],
    y: Sequence[float],
    labels: Sequence[str],
    tags: Sequence[str] | None = None,
    tol: float = 0.02,
) -> list[tuple[float, float, str]]:
    """One label per cluster of points that would overprint.

    Points closer than ``tol`` of each axis' span (in both axes) are joined, transitively, and
    labelled once at the cluster's first point: its distinct labels one a line, each followed by the
    ``tags`` of its points when they differ (``κ=0 (θ=0.05, θ=0.1)``), ``+ n more`` beyond four lines.
    Returns ``(x, y, text, members)`` per cluster, ``members`` the indices of its points.
    """
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    tags = list(tags) if tags is not None else [""] * len(xs)
    n = len(xs)
    if n == 0:
        return []
    spans = [np.ptp(v[np.isfinite(v)]) if np.isfinite(v).any() else 0.0 for v in (xs, ys)]
    near = (np.abs(xs[:, None] - xs[None]) <= tol * (spans[0] or 1.0)) & (
        np.abs(ys[:, None] - ys[None]) <= tol * (spans[1] or 1.0)
    )
    cluster = -np.ones(n, dtype=int)
    for i in range(n):  # connected components of the "would overprint" graph
        if cluster[i] >= 0:
            continue
        stack, cluster[i] = [i], i
        while stack:
            j = stack.pop()
            for k in np.flatnonzero(near[j] & (cluster < 0)):
                cluster[k] = i
                stack.append(int(k))
    out = []
    for c in dict.fromkeys(cluster.tolist()):
        members = np.flatnonzero(cluster == c)
        by_label: dict[str, list[str]] = {}
        for m in members:
            by_label.setdefault(labels[m], []).append(tags[m])
        lines = []
        for label, ts in by_label.items():
            ts = [t for t in dict.fromkeys(ts) if t]
            lines.append((label + (f" ({', '.join(ts)})" if len(ts) > 1 else "")).strip())
        lines = [line for line in lines if line]
        if len(lines) > 4:
            lines = lines[:3] + [f"+ {len(lines) - 3} more"]
        out.append((float(xs[members[0]]), float(ys[members[0]]), "\n".join(lines), members.tolist()))
    return out


def plot_frontier(
    df: pd.DataFrame,
    out: Path,
    objectives: Sequence[tuple[str, str]] = DEFAULT_OBJECTIVES,
    group_by: Sequence[str] | None = ("theta",),
    name: str = "frontier",
    title: str = "safety–efficacy frontier",
    aggregate_seeds: bool | None = None,
) -> list[Path]:
    """All trials (grey) and the frontier per group (default per theta), joined; each frontier point
    labelled by the config fields that vary (kappa, augmentation, epochs...), coincident points once.

    ``aggregate_seeds`` None averages seeds when a configuration has several (then one point per
    configuration at the mean, error bars +-1 std over its seeds); False draws one point per seed.
    A frame that already holds ``<objective>_std`` columns (a defence table) gets them as error bars.
    """
    ok = completed(df)
    (x, _), (y, _) = objectives[0], objectives[1]
    group_by = [c for c in (group_by or []) if c in ok.columns]
    aggregated = has_seed_replicates(ok) if aggregate_seeds is None else aggregate_seeds
    front = seed_frontier(ok, objectives, group_by or None, aggregated)
    fields = _label_fields(ok, group_by)
    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    seeds = f" ({int(ok['seed'].nunique())} seeds each)" if aggregated and "seed" in ok.columns else ""
    ax.scatter(ok[y], ok[x], color="0.82", s=16, zorder=1, label="every trial" + (" and seed" if seeds else ""))
    groups = front.groupby(group_by, sort=True) if group_by else [((), front)]
    points = []
    for key, g in groups:
        g = g.sort_values(y)
        key = key if isinstance(key, tuple) else (key,)
        legend = ", ".join(title_label(c, v) for c, v in zip(group_by, key, strict=True)) or "frontier"
        xerr = g[f"{y}_std"].fillna(0) if f"{y}_std" in g.columns else None
        yerr = g[f"{x}_std"].fillna(0) if f"{x}_std" in g.columns else None
        bars = ax.errorbar(
            g[y], g[x], xerr=xerr, yerr=yerr, marker="o", ms=5, capsize=2, lw=1.4, zorder=2, label=legend
        )
        tag = ", ".join(short_label(c, v) for c, v in zip(group_by, key, strict=True))
        points += [(r[y], r[x], _label(r, fields), tag, bars.lines[0].get_color()) for _, r in g.iterrows()]
    ax.set_xlabel(f"{y} ({'higher' if dict(objectives)[y] == 'max' else 'lower'} is better)")
    ax.set_ylabel(f"{x} ({'higher' if dict(objectives)[x] == 'max' else 'lower'} is better)")
    note = (
        f"mean ± 1 std over seeds{seeds}"
        if aggregated
        else ("one point per seed" if "seed" in ok.columns and ok["seed"].nunique() > 1 else "")
    )
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.margins(0.08)  # room for the labels of points on the edges
    if points:  # a label shared by points of several groups at one spot names them: "κ=0 (θ=0.05, θ=0.1)"
        xs, ys, labels, tags, colors = zip(*points, strict=True)
        merged = merge_coincident(xs, ys, labels, tags)
        # a label takes its group's colour; one shared by several groups stays black
        shades = [colors[m[0]] if len({colors[i] for i in m}) == 1 else "black" for *_, m in merged]
        place_labels(ax, [(px, py, text) for px, py, text, _ in merged], list(zip(xs, ys, strict=True)), colors=shades)
    return save_figure(fig, out, name)


def place_labels(
    ax,
    labels: Sequence[tuple[float, float, str]],
    avoid: Sequence[tuple[float, float]] = (),
    fontsize: float = 7,
    colors: Sequence[str] | None = None,
) -> list:
    """Annotate each ``(x, y, text)`` where its box overlaps no other label, no point of ``avoid`` and
    stays inside the axes: next to the point first, then farther out with a leader line; where every
    candidate collides, the one with the least overlap. Returns the annotations."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()  # lay the figure out first: boxes are measured in its final pixels
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    points = ax.transData.transform(np.asarray(avoid, dtype=float).reshape(-1, 2))
    taken = [Bbox.from_bounds(px - 4, py - 4, 8, 8) for px, py in points]
    near = [(6, 3), (6, -3), (-6, 3), (-6, -3)]
    angles = np.deg2rad([45, -45, 135, -135, 90, -90, 0, 180, 20, -20, 160, -160])
    far = [(r * np.cos(t), r * np.sin(t)) for r in (22, 38, 56, 80) for t in angles]
    lead = {"arrowstyle": "-", "color": "0.55", "lw": 0.7, "shrinkA": 0, "shrinkB": 3}
    done = []
    for k, (x, y, text) in enumerate(labels):
        best, best_box, best_cost = None, None, math.inf
        for dx, dy in near + far:
            ann = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                ha="left" if dx > 1 else "right" if dx < -1 else "center",
                va="bottom" if dy > 1 else "top" if dy < -1 else "center",
                fontsize=fontsize,
                color=colors[k] if colors else "black",
                zorder=4,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
                arrowprops=None if (dx, dy) in near else lead,
            )
            ann.set_in_layout(False)  # placed inside the axes already: the layout must not move them again
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer)  # the text alone: its leader line may cross points
            cost = sum(_area(Bbox.intersection(box, t)) for t in taken)
            cost += box.width * box.height - _area(Bbox.intersection(box, inside))  # what sticks out of the axes
            if cost < best_cost:
                if best is not None:
                    best.remove()
                best, best_box, best_cost = ann, box, cost
            else:
                ann.remove()
            if cost == 0:
                break
        taken.append(best_box)
        done.append(best)
    return done


def _area(box) -> float:
    return 0.0 if box is None else float(box.width * box.height)


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
    """max overlap^2 and the eigenvector index where it occurs, per kappa and theta (Table 2).

    With several seeds per cell: overlap^2 is their mean (``max_overlap_sq_std``: the sample std, ddof 1),
    the index is the one most seeds share — ties go to the lowest index, the top of the spectrum — and
    ``index_seeds`` says how many seeds share it (``3/5``).
    """
    ok = completed(df)
    cols = [c for c in ("kappa", "theta", "max_overlap_sq", "max_overlap_index") if c in ok.columns]
    if not _has(ok, "kappa", "theta", "max_overlap_sq", "max_overlap_index"):
        return pd.DataFrame(columns=cols)
    rows = []
    for (kappa, theta), g in ok.groupby(["kappa", "theta"]):
        counts = g["max_overlap_index"].astype(int).value_counts()
        top = int(counts.max())
        row = {"kappa": kappa, "theta": theta, "max_overlap_sq": g["max_overlap_sq"].mean(),
               "max_overlap_index": int(min(counts[counts == top].index))}
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


# --------------------------------------------------------------------------- detection over populations
FAMILIES = (
    ("det_lambda_", "spectral shape"),
    ("det_ipr_", "localisation"),
    ("det_window_", "localisation"),
    ("det_flip_", "flip concentration"),
    ("det_class_", "per-class curvature"),
    ("nc_", "baselines (NC, SS, AC)"),
    ("ss_", "baselines (NC, SS, AC)"),
    ("ac_", "baselines (NC, SS, AC)"),
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
        groups = [(str(k), list(g["statistic"])) for k, g in rest.groupby(panel_by, sort=True)]
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
    return [best[g] for g in sorted(best, key=lambda g: (g == ORACLE_FAMILY, order.index(g) if g in order else 99, g))]


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
        axes[1].set_title("best statistic per family (by mean AUROC over θ, picked after the fact)", fontsize=9)
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
        model = {c: row[c] for c in fields if c in row.index and not _isnan(row[c])}
        name = ", ".join(title_label(c, v) for c, v in model.items())
        trial = f" (trial {row['trial_id']})" if isinstance(row.get("trial_id"), str) and row["trial_id"] else ""
        fig.suptitle(f"Where the top input-Hessian eigenvectors put their energy — {name}{trial}", fontsize=9)
        label = file_tag({c: v for c, v in model.items() if c != "seed"})
        paths += save_figure(fig, out, f"localisation_{label}")
    return paths
