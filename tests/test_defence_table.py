"""Defence search: threats fixed, defences searched, objectives aggregated over threats
(analysis/defence_table.py, sweeper/defence_search.py); end to end with real Ray, MLflow and Optuna."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import ray
from conftest import driver_text

from analysis.defence_table import aggregate_models, defence_table
from analysis.schema import client, read_meta
from sweeper.cli import main
from sweeper.cli.readers import frontier_cmd
from sweeper.tracking import default_uri
from trainables.config import SweeperError
from trainables.record import Objective, parse_objectives


def _models(rows):
    return pd.DataFrame(rows, columns=["theta", "trigger", "seed", "clean_acc", "asr", "status"])


def test_worst_case_and_mean_aggregation_on_a_hand_built_defence():
    # two threats x two seeds; per-threat seed means: (0.05, square) clean .9 asr .2; (0.1, square) clean .8 asr .6
    models = _models(
        [
            (0.05, "square", 0, 0.92, 0.1, "completed"),
            (0.05, "square", 1, 0.88, 0.3, "completed"),
            (0.10, "square", 0, 0.70, 0.5, "completed"),
            (0.10, "square", 1, 0.90, 0.7, "completed"),
        ]
    )
    default = parse_objectives(None)
    assert [o.text() for o in default] == ["clean_acc:max:mean", "asr:min:worst"]
    agg, per = aggregate_models(models, default, ["theta", "trigger"])
    assert agg["status"] == "completed" and agg["n_models"] == 4
    assert math.isclose(agg["clean_acc"], 0.85) and math.isclose(agg["asr"], 0.6)  # mean of .9/.8, worst of .2/.6
    assert math.isclose(agg["asr_std"], pd.Series([0.5, 0.7]).std())  # the seeds' std of the worst threat
    assert list(per["n_seeds"]) == [2, 2]
    worst = parse_objectives("clean_acc:max,asr:min", aggregate="worst")
    agg, _ = aggregate_models(models, worst, ["theta", "trigger"])
    assert math.isclose(agg["clean_acc"], 0.8) and math.isclose(agg["asr"], 0.6)  # worst clean acc is the lowest
    mean = parse_objectives("clean_acc:max,asr:min:mean")
    agg, _ = aggregate_models(models, mean, ["theta", "trigger"])
    assert math.isclose(agg["asr"], 0.4) and math.isclose(agg["clean_acc"], 0.85)
    # a metric to minimise taken at its worst is its maximum; to maximise, its minimum
    objs = [Objective("clean_acc", "min", "worst"), Objective("asr", "max", "worst")]
    agg, _ = aggregate_models(models, objs, ["theta", "trigger"])
    assert math.isclose(agg["clean_acc"], 0.9) and math.isclose(agg["asr"], 0.2)


def test_a_diverged_model_makes_its_defence_a_failed_objective_never_a_good_one():
    good = [(0.05, "square", 0, 0.9, 0.1, "completed"), (0.1, "square", 0, 0.9, 0.1, "completed")]
    diverged = [(0.05, "square", 0, 0.9, 0.0, "completed"), (0.1, "square", 0, 0.1, 0.0, "diverged")]
    models = pd.concat(
        [_models(good).assign(defence_key="a", kappa=10.0), _models(diverged).assign(defence_key="b", kappa=1e4)]
    )
    table = defence_table(models, parse_objectives(None), ["theta"], ["kappa"])
    b = table.set_index("defence_key").loc["b"]
    assert b["status"] == "diverged" and b["n_diverged"] == 1
    assert math.isnan(b["clean_acc"]) and math.isnan(b["asr"])  # Optuna records NaN objectives as a failed trial


def test_a_defence_is_scored_only_once_every_owed_model_has_finished():
    objs = parse_objectives(None)
    only_diverged = pd.DataFrame([{"theta": 0.1, "status": "diverged"}])  # a diverged model has no final metrics
    agg, per = aggregate_models(only_diverged, objs, ["theta"], expected=1)
    assert agg["status"] == "diverged" and math.isnan(agg["asr"]) and per.empty
    failed = pd.DataFrame([{"theta": 0.1, "status": "failed"}])
    assert aggregate_models(failed, objs, ["theta"], expected=1)[0]["status"] == "failed"
    half = _models([(0.05, "square", 0, 0.9, 0.1, "completed"), (0.1, "square", 0, 0.9, 0.5, "running")])
    agg, _ = aggregate_models(half, objs, ["theta"], expected=2)
    assert agg["status"] == "running" and agg["n_failed"] == 0 and math.isnan(agg["asr"])
    queued = half.iloc[:1]  # the second threat's model has not started: no run, no row
    agg, _ = aggregate_models(queued, objs, ["theta"], expected=2)
    assert agg["status"] == "pending" and math.isnan(agg["asr"])
    assert aggregate_models(queued, objs, ["theta"], expected=1)[0]["status"] == "completed"


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--theta", "0.01:0.2"], "--theta=0.01:0.2 is a range, but theta is part of the threat"),
        (["--set", "theta=log:0.01:0.2"], "--theta=log:0.01:0.2 is a range"),
        (["--set", "trigger_amplitude=0.5:1"], "trigger_amplitude is part of the threat"),
        (["--set", "seed=0,1"], "use --seeds N"),
        (["--objectives", "clean_acc:max,asr:up"], "'asr:up' is invalid"),
        (["--objectives", "clean_acc:max,bogus:min"], "'bogus' is not a model metric"),
        (["--objectives", "clean_acc:max,asr:min:best"], "'asr:min:best' is invalid"),
        (["--objectives", "clean_acc:max"], "at least two objectives"),
        (["--theta", "0.05,2"], "theta=2.0 is invalid"),
        (["--seeds", "-1"], "seed=-1 is invalid"),
        (["--kappa", "log:1000:10"], "LO < HI"),
    ],
)
def test_a_bad_threat_or_objective_exits_2_before_anything_starts(argv, needle, tmp_path, capsys, no_ray):
    code = main(["search", *argv, "--storage", str(tmp_path / "s"), "--name", "bad"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert "smaller theta always lowers ASR" in err if "is a range" in needle else True
    assert not ray.is_initialized() and not (tmp_path / "s" / "bad").exists()


def test_objective_parsing_rejects_a_repeated_metric():
    with pytest.raises(SweeperError, match="appears twice"):
        parse_objectives("asr:min,asr:max")


FAST = [
    "--epochs",
    "4",
    "--set",
    "hessian_samples=50",
    "--set",
    "hessian_iterations=6",
    "--set",
    "hessian_top_k=3",
    "--set",
    "geometry=false",
    "--set",
    "detect=false",
]


def test_two_threat_search_resumes_after_a_kill_without_rerun_or_duplicates(tmp_path, capsys):
    import optuna

    storage = tmp_path / "s"
    uri = default_uri(storage)
    cmd = [
        sys.executable,
        "-m",
        "sweeper.cli",
        "search",
        "--theta",
        "0.05,0.1",
        "--trigger",
        "square",
        "--kappa",
        "log:10:1000",
        "--budget",
        "2",
        "--max-concurrent",
        "1",
        *FAST,
        "--name",
        "ds",
        "--storage",
        str(storage),
    ]
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    try:  # kill the driver (and its Ray) once one defence has finished and the next one's models run
        while True:
            assert proc.poll() is None, (
                "the search ended before it could be killed:\n" + (tmp_path / "driver.log").read_text()[-3000:]
            )
            assert time.time() < deadline, "no progress to interrupt"
            runs = _runs(uri, storage)
            defences = [r for r in runs if r.data.tags.get("sweeper.kind") == "defence"]
            if any(r.data.tags.get("sweeper.status") == "completed" for r in defences) and len(defences) >= 2:
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
    killed_at = time.time() * 1000
    driver = (tmp_path / "driver.log").read_text()
    for library_line in ("A new study created", "Token authentication", " INFO ", " WARNING "):  # the log's
        assert library_line not in driver_text(driver), (library_line, driver)
    assert "A new study created" in (storage / "ds" / "sweeper.log").read_text()
    done_before = {
        r.data.tags["sweeper.trial_key"]
        for r in _runs(uri, storage)
        if r.data.tags.get("sweeper.kind") == "trial" and r.data.tags.get("sweeper.status") == "completed"
    }
    assert 2 <= len(done_before) < 4
    time.sleep(1)

    code = main(["resume", "ds", "--storage", str(storage)])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out
    assert "Tuner.restore" not in out + captured.err and " WARNING " not in out + captured.err
    assert "sweep ds: 2 completed, 0 diverged, 0 failed, 0 interrupted, 0 pending, 2 total" in out, out
    assert "Traceback" not in driver_text(out)
    # one frontier over the defences, as `search` prints it: the two threats' theta is no group here
    assert "\nfrontier (" in out and "; per theta" not in out, out

    runs = _runs(uri, storage)
    defences = [r for r in runs if r.data.tags.get("sweeper.kind") == "defence"]
    models = [r for r in runs if r.data.tags.get("sweeper.kind") == "trial"]
    assert len(defences) == 2 and len({r.data.tags["sweeper.trial_key"] for r in defences}) == 2
    assert len(models) == 4 and len({r.data.tags["sweeper.trial_key"] for r in models}) == 4  # 2 defences x 2 threats
    by_run = {r.info.run_id: r for r in defences}
    c = client(uri)
    for m in models:  # nested under their defence's run, tagged with its key, every epoch logged once
        parent = by_run[m.data.tags["mlflow.parentRunId"]]
        assert m.data.tags["sweeper.defence_key"] == parent.data.tags["sweeper.trial_key"]
        assert sorted(x.step for x in c.get_metric_history(m.info.run_id, "train_loss")) == [1, 2, 3, 4]
        if m.data.tags["sweeper.trial_key"] in done_before:  # finished before the kill: never re-run
            assert max(x.timestamp for x in c.get_metric_history(m.info.run_id, "clean_acc")) < killed_at
    study = optuna.load_study(study_name="ds", storage=f"sqlite:///{storage / 'ds' / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    # a defence proposed just before the kill, when Tune had not saved it, is proposed again after the
    # resume (same sampler state) and found in MLflow by its key; its first Optuna trial is closed as FAIL
    assert states.count("COMPLETE") == 2 and set(states) <= {"COMPLETE", "FAIL"} and len(states) <= 3, states
    assert all(list(t.params) == ["trial/kappa"] for t in study.trials)  # the threat is never a search axis
    meta = read_meta(str(storage), "ds")
    assert meta.search["threats"] == [{"theta": 0.05}, {"theta": 0.1}] and meta.spec["fixed"]["trigger"] == "square"

    res = frontier_cmd("ds", storage=str(storage))
    front, detail = res["frontier"], res["detail"]
    assert 1 <= len(front) <= 2 and front["asr"].notna().all()
    assert set(detail["theta"]) == {0.05, 0.1} and set(detail["defence_key"]) == set(front["defence_key"])
    key = front["defence_key"].iloc[0]
    per = detail[detail["defence_key"] == key]
    assert math.isclose(front["asr"].iloc[0], per["asr"].max()) and math.isclose(
        front["clean_acc"].iloc[0], per["clean_acc"].mean()
    )  # worst-case ASR, mean clean accuracy
    from_ray = frontier_cmd("ds", storage=str(storage), source="ray")  # MLflow down: the defences' Tune results
    assert set(from_ray["frontier"]["defence_key"]) == set(front["defence_key"])
    code = main(["frontier", "ds", "--storage", str(storage)])
    out = capsys.readouterr().out
    assert code == 0 and "asr min (worst over threats)" in out and "per threat (mean over seeds)" in out, out
    assert main(["frontier", "ds", "--storage", str(storage), "--threats", "mean"]) == 0
    assert "asr min (mean over threats)" in capsys.readouterr().out
    assert main(["report", "ds", "--storage", str(storage)]) == 0
    assert (storage / "ds-report" / "defences.csv").is_file() and (
        storage / "ds-report" / "defence_frontier.png"
    ).is_file()
    st = main(["status", "ds", "--storage", str(storage)])
    assert st == 0 and "2 completed" in capsys.readouterr().out
    assert not list((storage / "ds" / "models").glob("*.pt"))  # finished models leave no checkpoint behind


def _runs(uri, storage):
    if not (storage / "ds" / "sweeper.json").exists():
        return []
    try:
        c = client(uri)
        exp = c.get_experiment_by_name("ds")
        return c.search_runs([exp.experiment_id]) if exp else []
    except Exception:
        return []
