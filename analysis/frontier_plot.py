"""The safety-efficacy frontier figure: frontier points joined and labelled (coincident points share
one label, labels placed so that none overprints), seeds averaged first (mean, +-1 std error bars) when a
configuration has several."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from .pareto import DEFAULT_OBJECTIVES, has_seed_replicates, seed_frontier  # noqa: E402
from .plots import label_fields, point_label, save_figure, short_label, title_label  # noqa: E402
from .results import completed  # noqa: E402

FAMILY_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def family_markers(families) -> dict[str, str]:
    """A marker per defence family (``analysis.results.defence_family``), ``none`` first (a circle), then in
    name order; more families than markers reuse them."""
    ordered = sorted({str(f) for f in families}, key=lambda f: (f != "none", f))
    return {f: FAMILY_MARKERS[i % len(FAMILY_MARKERS)] for i, f in enumerate(ordered)}


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
    fields = label_fields(ok, group_by)
    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    seeds = f" ({int(ok['seed'].nunique())} seeds each)" if aggregated and "seed" in ok.columns else ""
    ax.scatter(ok[y], ok[x], color="0.82", s=16, zorder=1, label="every trial" + (" and seed" if seeds else ""))
    groups = front.groupby(group_by, sort=True) if group_by else [((), front)]
    # a sweep over defence families: each frontier point's marker says its family (the colour, its group)
    markers = family_markers(front["defence_family"].dropna()) if "defence_family" in front.columns else {}
    points = []
    for key, g in groups:
        g = g.sort_values(y)
        key = key if isinstance(key, tuple) else (key,)
        legend = ", ".join(title_label(c, v) for c, v in zip(group_by, key, strict=True)) or "frontier"
        xerr = g[f"{y}_std"].fillna(0) if f"{y}_std" in g.columns else None
        yerr = g[f"{x}_std"].fillna(0) if f"{x}_std" in g.columns else None
        bars = ax.errorbar(
            g[y],
            g[x],
            xerr=xerr,
            yerr=yerr,
            marker="none" if markers else "o",
            ms=5,
            capsize=2,
            lw=1.4,
            zorder=2,
            label=legend,
        )
        for family, part in g.groupby("defence_family", sort=True) if markers else []:
            ax.scatter(
                part[y],
                part[x],
                marker=markers[str(family)],
                s=42,
                color=bars.lines[0].get_color(),
                edgecolors="black",
                linewidths=0.6,
                zorder=3,
            )
        tag = ", ".join(short_label(c, v) for c, v in zip(group_by, key, strict=True))
        points += [(r[y], r[x], point_label(r, fields), tag, bars.lines[0].get_color()) for _, r in g.iterrows()]
    ax.set_xlabel(f"{y} ({'higher' if dict(objectives)[y] == 'max' else 'lower'} is better)")
    ax.set_ylabel(f"{x} ({'higher' if dict(objectives)[x] == 'max' else 'lower'} is better)")
    note = (
        f"mean ± 1 std over seeds{seeds}"
        if aggregated
        else ("one point per seed" if "seed" in ok.columns and ok["seed"].nunique() > 1 else "")
    )
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9)
    handles, _ = ax.get_legend_handles_labels()
    handles += [  # the families' markers, in black: the colours belong to the groups
        Line2D([], [], ls="none", marker=m, color="0.25", mec="black", label=f"family: {f}") for f, m in markers.items()
    ]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
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
