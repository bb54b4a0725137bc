import math

import numpy as np
import pandas as pd
import pytest

from analysis import plots
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
                rows.append({"theta": theta, "kappa": kappa, "seed": seed, "augment": False, "epochs": 15,
                             "status": "completed", "clean_acc": 0.95 - kappa / 1000, "asr": asr,
                             "overlap_sq": ov, "max_overlap_sq": ov + 0.1, "max_overlap_index": 1})
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


def test_figures_are_valid_pngs_and_svgs(tmp_path):
    df = synthetic()
    files = plots.plot_asr_vs_theta(df, tmp_path) + plots.plot_overlap_vs_theta(df, tmp_path)
    files += plots.plot_frontier(df, tmp_path) + plots.plot_lag(plots.detectability_lag(df), tmp_path)
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
    assert pngs == ["asr_vs_theta.png", "detectability_lag.png", "eigenvectors.png", "frontier.png",
                    "overlap_vs_theta.png"]
    maps = sorted(p.name for p in out.glob("localisation_*.png"))  # the clean and the most poisoned model per cell
    assert maps and all(m.endswith(".png") and "theta=" in m for m in maps), maps
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
