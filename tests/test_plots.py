import math

import numpy as np
import pandas as pd
import pytest

from analysis import detection_plots, frontier_plot, plots
from analysis.report import markdown_table, write_report
from sweeper.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def synthetic():
    rows = []
    for kappa in (0.0, 100.0):
        for theta in (0.0, 0.01, 0.02, 0.03):
            for seed in (0, 1):
                asr = min(1.0, theta * (60 if kappa == 0 else 20))
                ov = 0.02 + 0.001 * seed + (0.5 if theta >= (0.02 if kappa == 0 else 0.03) else 0.0)
                rows.append(
                    {
                        "theta": theta,
                        "kappa": kappa,
                        "seed": seed,
                        "augment": False,
                        "epochs": 15,
                        "status": "completed",
                        "clean_acc": 0.95 - kappa / 1000,
                        "asr": asr,
                        "overlap_sq": ov,
                        "max_overlap_sq": ov + 0.1,
                        "max_overlap_index": 1,
                    }
                )
    return pd.DataFrame(rows)


def test_detectability_lag_on_hand_made_data():
    lag = plots.detectability_lag(synthetic())
    k0 = lag[lag.kappa == 0].iloc[0]
    assert k0["theta_asr"] == 0.01 and k0["theta_visible"] == 0.02 and k0["lag"] == pytest.approx(0.01)
    clean = np.array([0.02, 0.021])
    assert k0["threshold"] == pytest.approx(clean.mean() + 3 * clean.std(ddof=1))
    k100 = lag[lag.kappa == 100].iloc[0]
    assert k100["theta_asr"] == 0.03 and k100["theta_visible"] == 0.03 and k100["lag"] == 0.0
    never = synthetic().assign(asr=0.1)
    assert math.isnan(plots.detectability_lag(never)["theta_asr"].iloc[0])


def test_tables_1_and_2():
    df = synthetic()
    t1 = plots.table1(df)
    assert list(t1.columns) == ["epochs", "κ=0 Acc", "κ=100 Acc", "κ=0 ASR", "κ=100 ASR"]
    assert t1["κ=0 ASR"].iloc[0] == 100.0 and t1["κ=100 Acc"].iloc[0] == 85.0
    t2 = plots.table2(df)
    assert len(t2) == 8 and set(t2["max_overlap_index"]) == {1}
    assert "| theta |" in markdown_table(df[["theta", "kappa"]].head(2))


def test_table2_with_seeds_names_the_index_most_seeds_share_and_how_many():
    seeds = pd.DataFrame(
        {
            "kappa": 0,
            "theta": 0.1,
            "status": "completed",
            "seed": [0, 1, 2, 3],
            "max_overlap_sq": [0.2, 0.4, 0.3, 0.5],
            "max_overlap_index": [2, 1, 2, 1],
        }
    )
    row = plots.table2(seeds).iloc[0]
    assert row["max_overlap_index"] == 1 and row["index_seeds"] == "2/4"  # a tie: the lowest index
    assert row["max_overlap_sq"] == pytest.approx(0.35) and row["max_overlap_sq_std"] == pytest.approx(
        np.std([0.2, 0.4, 0.3, 0.5], ddof=1)
    )
    one = plots.table2(seeds.head(1))
    assert "index_seeds" not in one.columns and one["max_overlap_index"].iloc[0] == 2


def test_figures_are_valid_pngs_and_svgs(tmp_path):
    df = synthetic()
    files = plots.plot_asr_vs_theta(df, tmp_path) + plots.plot_overlap_vs_theta(df, tmp_path)
    files += frontier_plot.plot_frontier(df, tmp_path) + plots.plot_lag(plots.detectability_lag(df), tmp_path)
    files += plots.plot_eigenvector_grid(df, lambda row: np.random.default_rng(0).normal(size=(2, 3, 8, 8)), tmp_path)
    assert len(files) == 10
    for f in files:
        data = f.read_bytes()
        assert len(data) > 1000
        assert data.startswith(PNG) if f.suffix == ".png" else b"<svg" in data[:500]


def test_report_on_a_real_sweep_writes_figures_and_logs_them(grid_sweep, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from analysis.results import parent_run_id
    from sweeper.tracking import default_uri

    storage, _ = grid_sweep
    out = tmp_path / "rep"
    res = write_report("grid", out, storage)
    pngs = sorted(p.name for p in out.glob("*.png") if not p.name.startswith("localisation_"))
    assert pngs == [
        "asr_vs_theta.png",
        "detectability_lag.png",
        "eigenvectors.png",
        "frontier.png",
        "overlap_vs_theta.png",
    ]
    maps = sorted(p.name for p in out.glob("localisation_*.png"))  # the clean and the most poisoned model per cell
    assert maps and all(m.startswith("localisation_theta") and "=" not in m for m in maps), maps
    assert all((out / m).with_suffix(".svg").is_file() for m in maps)  # drawn here, as every figure: PNG + SVG
    assert all(p.read_bytes().startswith(PNG) and p.stat().st_size > 1000 for p in out.glob("*.png"))
    md = (out / "summary.md").read_text()
    problems = md.split("## Not completed")[1].split("## All trials")[0]
    assert problems.count("| diverged |") == 2  # listed, not dropped
    assert "<table" in (out / "summary.html").read_text()
    uri = default_uri(storage)
    run = parent_run_id("grid", uri)
    assert res["mlflow_parent_run"] == run
    logged = {a.path for a in MlflowClient(uri).list_artifacts(run, "report")}
    assert "report/frontier.png" in logged and "report/summary.html" in logged
    # the CLI: refuses a non-empty folder, then the frontier table
    assert main(["report", "grid", "--storage", str(storage), "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    csv = tmp_path / "front.csv"
    assert main(["frontier", "grid", "--storage", str(storage), "--csv", str(csv)]) == 0
    text = capsys.readouterr().out
    assert "frontier of grid" in text and "not completed (2)" in text and "diverged" in text
    assert len(pd.read_csv(csv)) >= 2
    assert main(["frontier", "grid", "--storage", str(storage), "--objectives", "clean_acc:max,nope:min"]) == 2
    assert "metric(s) ['nope'] not in the results" in capsys.readouterr().err
    assert main(["frontier", "grid", "--storage", str(storage), "--group-by", "bogus"]) == 2


DETECT_STATS = [
    "det_flip_excess",
    "det_flip_max",
    "det_flip_r0.5",
    "det_ipr_1",
    "det_ipr_max",
    "det_lambda_ratio",
    "det_lambda_trace_ratio",
    "det_window_frac_w2",
    "det_window_frac_w3",
    "det_window_frac_w4",
    "det_class_flip_max",
    "det_class_flip_excess",
    "det_class_lambda_anomaly",
    "det_class_lambda_ratio",
    "det_class_share_max",
    "max_overlap_sq",
    "overlap_sq",
]


def population(thetas=(0.0, 0.02, 0.05), seeds=6, kappas=(0.0, 400.0)):
    """Clean and poisoned models per kappa with the 17 statistics a detection sweep carries (every
    other one shifts with theta), ``seeds`` seeds of each configuration."""
    rng = np.random.default_rng(0)
    rows = []
    for kappa in kappas:
        for theta in thetas:
            for seed in range(seeds):
                row = {
                    "theta": theta,
                    "kappa": kappa,
                    "seed": seed,
                    "augment": False,
                    "epochs": 15,
                    "status": "completed",
                    "clean_acc": 0.96 - theta,
                    "asr": min(1.0, 0.05 + 12 * theta),
                    "overlap_sq": 0.0,
                    "max_overlap_sq": 0.0,
                    "max_overlap_index": 1,
                    "trial_id": f"t{len(rows)}",
                }
                for i, s in enumerate(DETECT_STATS):
                    row[s] = rng.normal(theta * 40 * (i % 2), 0.3)
                rows.append(row)
    return pd.DataFrame(rows)


def test_every_figure_is_png_and_svg_without_equals_in_its_name(tmp_path):
    from analysis.detect import detection_table

    df = population()
    one = df[df["kappa"] == 0]  # one cell's detection figures: drawing them is the slow part
    table = detection_table(one, n_boot=5)

    def vectors(row):  # a poisoned model's v1 sits on a corner patch
        v = np.random.default_rng(int(row["seed"])).normal(size=(3, 1, 8, 8))
        v[0, :, 5:, 5:] += 10 * (row["theta"] > 0)
        return v

    files = plots.plot_asr_vs_theta(df, tmp_path) + plots.plot_overlap_vs_theta(df, tmp_path)
    files += frontier_plot.plot_frontier(df, tmp_path) + plots.plot_lag(plots.detectability_lag(df), tmp_path)
    files += plots.plot_eigenvector_grid(df, vectors, tmp_path) + detection_plots.plot_detection(table, one, tmp_path)
    maps = detection_plots.plot_localisation(df, vectors, tmp_path)
    assert sorted(p.name for p in maps if p.suffix == ".png") == [
        "localisation_theta0.05_kappa0.png",
        "localisation_theta0.05_kappa400.png",
        "localisation_theta0_kappa0.png",
        "localisation_theta0_kappa400.png",
    ]
    files += maps
    assert {p.name for p in files} >= {"detection.png", "detection_all.svg", "detectability_lag.svg", "frontier.svg"}
    stems = {p.stem for p in files}
    for stem in stems:  # every figure both ways, and a name a shell or a URL takes as it is
        assert (tmp_path / f"{stem}.png").read_bytes().startswith(PNG), stem
        assert b"<svg" in (tmp_path / f"{stem}.svg").read_bytes()[:500], stem
        assert "=" not in stem and " " not in stem, stem
    assert len(files) == 2 * len(stems)
    assert (
        detection_plots.plot_localisation(df.drop(columns="det_ipr_1"), vectors, tmp_path) == []
    )  # no localisation run


def test_detection_panels_hold_a_few_statistics_with_the_oracles_in_each():
    from analysis.detect import ORACLES, detection_table

    g = detection_table(population(kappas=(0.0,)), n_boot=5)
    panels = detection_plots.detection_panels(g)
    assert all(len(stats) <= 6 and stats[-2:] == ["max_overlap_sq", "overlap_sq"] for _, stats in panels)
    shown = [s for _, stats in panels for s in stats if s not in ORACLES]
    assert sorted(shown) == sorted(s for s in DETECT_STATS if s not in ORACLES)  # each once
    assert [t for t, _ in panels][:2] == ["spectral shape", "localisation (1/2)"]
    best = detection_plots.best_per_family(g)
    fams = [detection_plots.statistic_family(s, s in ORACLES) for s in best]
    assert fams == [
        "spectral shape",
        "localisation",
        "flip concentration",
        "per-class curvature",
        detection_plots.ORACLE_FAMILY,
    ]
    # the access-level hook: any column of the table groups the panels instead of the families
    access = g.assign(access=np.where(g["statistic"].str.startswith("det_class_"), "white-box", "black-box"))
    assert [t for t, _ in detection_plots.detection_panels(access, panel_by="access")][0].startswith("black-box")


def test_coincident_points_get_one_label():
    # four frontier points on one spot (three seeds and another kappa), one apart
    merged = frontier_plot.merge_coincident(
        [1.0, 1.0, 1.0, 1.0, 0.2],
        [0.96, 0.96, 0.96, 0.96, 0.85],
        ["κ=0", "κ=0", "κ=0", "κ=200", "κ=400"],
        ["θ=0.05", "θ=0.1", "θ=0.1", "θ=0.1", ""],
    )
    assert [(x, y, text) for x, y, text, _ in merged] == [
        (1.0, 0.96, "κ=0 (θ=0.05, θ=0.1)\nκ=200"),
        (0.2, 0.85, "κ=400"),
    ]
    assert merged[0][3] == [0, 1, 2, 3]
    many = frontier_plot.merge_coincident([0.0] * 6, [0.0] * 6, [f"κ={k}" for k in range(6)])
    assert len(many) == 1 and many[0][2].splitlines()[-1] == "+ 3 more"


def _figure(layout):
    """A figure whose layout depends on text extents: titles, tick labels, a legend outside the axes."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6, 3), layout=layout)
    for i, ax in enumerate(axes):
        ax.plot([0, 1, 2], [i, 2 * i + 1, 0.5], label=f"series {i}")
        ax.set_title(f"panel {i}: a long title with θ = 0.05")
        ax.set_xlabel("poison fraction θ")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1))
    return fig


@pytest.mark.parametrize("layout", ["constrained", None])
def test_save_figure_draws_what_savefig_tight_draws(layout, tmp_path):
    """save_figure lays a figure out once for both formats; its PNG is matplotlib's own
    ``savefig(bbox_inches="tight")`` pixel for pixel (tolerance 0). The same comparison against another padding fails."""
    from PIL import Image

    plots.save_figure(_figure(layout), tmp_path, "once")
    ref = _figure(layout)
    ref.savefig(tmp_path / "tight.png", dpi=plots.DPI, bbox_inches="tight")
    ref.savefig(tmp_path / "wider.png", dpi=plots.DPI, bbox_inches="tight", pad_inches=0.3)
    once, tight, wider = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("once", "tight", "wider"))
    assert once.shape == tight.shape and np.array_equal(once, tight)
    assert once.shape != wider.shape  # the comparison can fail
    assert (tmp_path / "once.svg").read_text().lstrip().startswith("<?xml")
