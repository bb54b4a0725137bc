"""The theory pipeline: the KRR trial swept over m and r against the paper's closed forms, summarised and plotted.

The closed forms themselves live in :mod:`trainables.exact_models.closed_forms` (re-exported here, numbered as
in the paper) so the trial layer can use them without importing the analysis layer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainables.exact_models.closed_forms import (  # noqa: F401 (the closed forms, re-exported)
    degrees_of_freedom,
    detectable,
    efficacy,
    efficacy_saturation,
    efficacy_small_m,
    gain,
    gr_coefficients,
    gradient_gram,
    min_detectable_efficacy,
    mode_filter,
    near_clone_efficacy,
    near_clone_k0,
    near_clone_spike,
    rbf,
    rbf_grad_sq,
    rbf_gram,
    rbf_spectral_density,
    rbf_spike,
    rbf_spike_factor,
    spike,
    spike_factor,
    spike_from_efficacy,
    training_residual,
)

if TYPE_CHECKING:
    import pandas as pd


# ----------------------------------------------------------------------------- numeric against closed form
def kernel_sweep(base, param: str, values) -> pd.DataFrame:
    """Run the KRR trial of ``trainables.exact_models.kernel`` for each value of one field; one row per value."""
    import dataclasses

    import pandas as pd

    from trainables.exact_models.kernel import run_kernel_trial

    rows = []
    for v in values:
        cfg = dataclasses.replace(base, **{param: v})
        rows.append({**cfg.to_dict(), **run_kernel_trial(cfg).metrics})
    return pd.DataFrame(rows)


def summarize(by_m: pd.DataFrame, by_r: pd.DataFrame, y_t: float = 1.0, efficacy_floor: float = 0.5) -> dict:
    """The numbers the paper's laws predict, measured: small-m slope, saturation, twilight-zone radius.

    The slope is the secant from the smallest two m (include m = 0); its closed form is eq 12's
    k0 y_t / c with c = n_clean lambda. Because eq 2 uses c = n lambda with n counting the poisons,
    S(m) -> 1 / (k_zeta + lambda) and the saturation is k0 y_t / (k_zeta + lambda), reported beside
    eq 13's k0 y_t / k_zeta. The twilight zone is where Delta f >= ``efficacy_floor`` while the
    Gauss-Newton spike stays below the clean model's median curvature over its training data.
    """
    ms = by_m.sort_values("m")
    a, b = ms.iloc[0], ms.iloc[1]
    slope = float((b["delta_f"] - a["delta_f"]) / (b["m"] - a["m"]))
    lam = float(a["lam"])
    c0 = float(a["n_clean"]) * lam  # c as m -> 0
    big = ms.iloc[-1]
    zone = by_r[(by_r["delta_f"] >= efficacy_floor) & (by_r["spike"] < by_r["spike_background"])]
    bg = float(by_r["spike_background"].median())
    ell = float(by_r["ell"].iloc[0])
    s_r = float(by_r["gain_closed"].iloc[0])
    return {
        "slope_small_m": slope,
        "slope_small_m_closed": float(a["k0"] * y_t / c0),
        "saturation_m": int(big["m"]),
        "saturation_measured": float(big["delta_f"]),
        "saturation_eq13": float(big["delta_f_saturation"]),
        "saturation_with_n_lambda": float(big["k0"]) * y_t / (1 + lam),  # k_zeta = 1 for the RBF kernel
        "spike_background": bg,
        "twilight_r_max": float(zone["r"].max()) if len(zone) else math.nan,
        "twilight_delta_f_at_r_max": float(zone.loc[zone["r"].idxmax(), "delta_f"]) if len(zone) else math.nan,
        "twilight_r_closed": ell**2 * math.sqrt(bg) / s_r if s_r > 0 else math.nan,  # spike = S^2 r^2/ell^4 = bg
        "max_rel_err_delta_f": float(by_m["delta_f_rel_err"].max()),
        "max_rel_err_spike": float(by_m.loc[by_m["m"] > 0, "spike_rel_err"].max()),  # m = 0: no spike to compare
    }


def plot_theory(by_m: pd.DataFrame, by_r: pd.DataFrame, out, efficacy_floor: float = 0.5) -> list:
    """Numeric KRR against the closed forms: efficacy over m, curvature over efficacy, both over r."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_figure

    out = Path(out)
    ms = by_m.sort_values("m")
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    ax.plot(ms["m"], ms["delta_f"], "o", label="numeric Δf(x₀)")
    ax.plot(ms["m"], ms["delta_f_closed"], "-", label="k₀ y_t S(m) (eq 11)")
    pos = ms[ms["m"] > 0]
    ax.plot(pos["m"], pos["delta_f_small_m"], ":", label="k₀ y_t m / c (eq 12)")
    ax.axhline(float(ms["delta_f_saturation"].iloc[-1]), ls="--", color="0.5", label="k₀ y_t / k_ζ (eq 13)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1.1 * float(ms["delta_f_saturation"].max()))
    ax.set_xlabel("poisons m")
    ax.set_title("efficacy: linear in m, then saturating", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(ms["delta_f"] ** 2, ms["spike"], "o", label="numeric ‖∇ₓf(x₀)‖²")
    ax.plot(ms["delta_f"] ** 2, ms["r_k_closed"] * ms["delta_f"] ** 2, "-", label="R_k (Δf)² (eq 16)")
    ax.set_xlabel("(Δf)²")
    ax.set_ylabel("Λ_GN")
    ax.set_title("curvature quadratic in efficacy", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[2]
    rs = by_r.sort_values("r")
    ax.plot(rs["r"], rs["spike"], "o", label="numeric Λ_GN")
    ax.plot(rs["r"], rs["spike_closed"], "-", label="S² r²/ℓ⁴ k₀² (eqs 15, 19)")
    ax.plot(rs["r"], rs["spike_background"], "--", color="0.5", label="clean background")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("r = ‖x₀ − ζ‖")
    ax2 = ax.twinx()
    ax2.plot(rs["r"], rs["delta_f"], "s-", color="C3", ms=3, label="Δf(x₀)")
    ax2.axhline(efficacy_floor, color="C3", ls=":", lw=1)
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("Δf", color="C3")
    zone = rs[(rs["delta_f"] >= efficacy_floor) & (rs["spike"] < rs["spike_background"])]
    if len(zone):
        ax.axvspan(float(zone["r"].min()), float(zone["r"].max()), color="C2", alpha=0.15, label="twilight zone")
    ax.set_title("near clones: spike vanishes, efficacy stays", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, out, "theory")


def run_theory(
    base, ms: list[int], rs: list[float], m_for_r: int, out: str | Path, overwrite: bool = False
) -> dict[str, Any]:
    """The ``sweeper theory`` pipeline: sweep m, then r at ``m_for_r``; write figures, CSVs and
    ``summary.json`` into ``out`` (a non-empty folder is refused unless ``overwrite``)."""
    import dataclasses

    from trainables.config import SweeperError

    from .report import check_out_dir

    out = check_out_dir(out, overwrite)
    if len(ms) < 2:
        raise SweeperError(f"--m={','.join(map(str, ms))} is invalid: expected at least two values (e.g. --m 1,2,4,8)")
    by_m = kernel_sweep(base, "m", ms)
    by_r = kernel_sweep(dataclasses.replace(base, m=m_for_r), "r", rs)
    summary = summarize(by_m, by_r)
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_theory(by_m, by_r, out)
    by_m.to_csv(out / "by_m.csv", index=False)
    by_r.to_csv(out / "by_r.csv", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return {"summary": summary, "figures": figures}
