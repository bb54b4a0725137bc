"""Every normal path of the sweep commands ends right: run, resume, status, frontier and report, for
network, kernel and linear sweeps, with seeds and after an interrupt (real Ray, real MLflow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
from conftest import driver_text
from mlflow.tracking import MlflowClient

from analysis.results import CONFIG_FIELDS, load_results
from analysis.schema import read_meta
from sweeper.cli import main
from sweeper.cli.readers import frontier_cmd
from sweeper.spaces import SweepSpec
from sweeper.tracking import default_uri
from tests.conftest import ONE_WORKER

FAST = [
    "--epochs",
    "1",
    "--set",
    "hessian_samples=50",
    "--set",
    "hessian_iterations=6",
    "--set",
    "hessian_top_k=3",
    "--set",
    "geometry=false",
    *ONE_WORKER,
]


def cli(argv, capsys):
    capsys.readouterr()  # what earlier calls printed is not this command's output
    code = main(argv)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in driver_text(text), text
    return code, out.out, out.err


def test_seeded_sweep_every_command_ends_right_and_config_round_trips(tmp_path, capsys):
    st = str(tmp_path)
    # seeds, two penalty conventions and an lr: the fields the metrics used to overwrite
    code, out, err = cli(
        [
            "run",
            "--theta",
            "0.1",
            "--kappa",
            "100",
            "--seeds",
            "2",
            "--set",
            "penalty=listing1,eq25",
            "--set",
            "lr=0.02",
            *FAST,
            "--name",
            "s",
            "--storage",
            st,
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    assert "sweep s: 4 completed, 0 diverged, 0 failed, 0 interrupted, 0 pending, 4 total" in out
    assert "frontier (maximize clean_acc, minimize asr" in out
    assert f"browse: sweeper ui s --storage {st}" in out  # the embedded store: how to open its runs table

    meta = read_meta(st, "s")
    expected = SweepSpec.from_dict(meta.spec).configs()
    for source in ("mlflow", "ray"):
        df = load_results("s", st, source=source)
        assert len(df) == 4 and (df["status"] == "completed").all(), source
        assert set(df["penalty"]) == {"listing1", "eq25"} and set(df["lr"]) == {0.02}, source
        assert df["penalty_value"].notna().all() and df["hessian_samples_used"].eq(50).all(), source
        for cfg in expected:
            d = cfg.to_dict()
            row = df[(df["seed"] == d["seed"]) & (df["penalty"] == d["penalty"])]
            assert len(row) == 1, (source, d)
            for field, value in d.items():
                got = row.iloc[0][field]
                assert got == value or (value is None and pd.isna(got)), (source, field, got, value)

    agg = frontier_cmd("s", storage=st, aggregate_seeds=True, group_by="penalty")["frontier"]
    assert (agg["n_seeds"] == 2).all() and set(agg["penalty"]) == {"listing1", "eq25"}
    assert frontier_cmd("s", storage=st, group_by="none")["frontier"].shape[0] >= 1
    code, out, _ = cli(["frontier", "s", "--storage", st, "--group-by", "none"], capsys)
    assert code == 0 and "per " not in out.splitlines()[0]

    code, out, _ = cli(["status", "s", "--storage", st], capsys)
    assert code == 0 and "4 completed, 0 diverged, 0 failed, 0 running, 0 interrupted, 0 pending, 4 total" in out
    code, out, err = cli(["report", "s", "--storage", st], capsys)
    assert code == 0, err
    csv = pd.read_csv(tmp_path / "s-report" / "results.csv")
    assert set(csv["penalty"]) == {"listing1", "eq25"}
    maps = sorted(p.name for p in (tmp_path / "s-report").glob("localisation_*.png"))
    assert maps and "localisation_" in (tmp_path / "s-report" / "summary.md").read_text(), maps  # from MLflow

    code, out, err = cli(["resume", "s", "--storage", st], capsys)
    assert code == 0 and "4 completed" in out, err
    runs = load_results("s", st, source="mlflow")
    assert len(runs) == 4 and runs["trial_key"].is_unique
    from analysis.schema import client

    names = {r.info.run_name for r in client(meta.mlflow_uri).search_runs([meta.experiment_id])}
    assert {"penalty=listing1 seed=0", "penalty=eq25 seed=1", "s"} <= names  # child runs read at a glance


def test_kernel_and_linear_sweeps_summarise_report_and_draw_their_frontiers(tmp_path, capsys):
    st = str(tmp_path)
    code, out, err = cli(
        [
            "run",
            "--kind",
            "kernel",
            "--set",
            "m=1,8,64",
            "--set",
            "r=0.1",
            "--set",
            "kappa=0,1",
            *ONE_WORKER,
            "--name",
            "k",
            "--storage",
            st,
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    assert "6 completed" in out and "delta_f" in out and "frontier (minimize residual, minimize delta_f" in out
    assert "Empty DataFrame" not in out
    front = frontier_cmd("k", storage=st)["frontier"]
    assert len(front) >= 1 and front["delta_f"].notna().all()
    code, _, err = cli(["report", "k", "--storage", st], capsys)
    assert code == 0, err
    assert (tmp_path / "k-report" / "kernel_vs_m.png").is_file()

    code, out, err = cli(
        [
            "run",
            "--kind",
            "linear",
            "--set",
            "theta=0,0.05,0.1",
            *ONE_WORKER,
            "--name",
            "l",
            "--storage",
            st,
            "--quiet",
        ],
        capsys,
    )
    assert code == 0 and "3 completed" in out and "clean_acc" in out, err
    code, _, err = cli(["report", "l", "--storage", st], capsys)
    assert code == 0, err
    assert (tmp_path / "l-report" / "asr_vs_theta.png").is_file()
    # both kinds went through the network's path: one child run each, the kind's params, its artifacts, its
    # numbers checked against the closed forms
    uri = default_uri(tmp_path)
    runs = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("l").experiment_id], "tags.`sweeper.kind` = 'trial'"
    )
    assert len(runs) == 3 and all(r.data.params["kind"] == "linear" for r in runs)
    assert "weights.png" in {a.path for a in MlflowClient(uri).list_artifacts(runs[0].info.run_id)}
    assert load_results("l", st)["step_rel_err"].max() < 1e-8
    assert (load_results("k", st)["delta_f_rel_err"] < 1e-3).all()
    code, out, _ = cli(["status", "l", "--storage", st], capsys)
    assert code == 0 and "3 completed" in out
    # the rest of the matrix through the CLI: status and resume of the kernel sweep, frontier and resume
    # of the linear one (a finished sweep resumes to the same counts, re-running nothing)
    code, out, _ = cli(["status", "k", "--storage", st], capsys)
    assert code == 0 and "6 completed" in out
    for name, n in (("k", 6), ("l", 3)):
        code, out, err = cli(["resume", name, "--storage", st], capsys)
        assert code == 0 and f"{n} completed, 0 diverged, 0 failed, 0 interrupted, 0 pending" in out, err
        assert len(load_results(name, st, source="mlflow")) == n
    code, out, err = cli(["frontier", "l", "--storage", st], capsys)
    assert code == 0 and "asr" in out and "Empty DataFrame" not in out, err


def _counts(text: str, name: str) -> dict[str, int]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"sweep {name}"))
    parts = line.split(":", 1)[1] if line.startswith(f"sweep {name}:") else line.split("):", 1)[1]
    return {k: int(v) for v, k in (p.split() for p in parts.strip().split(", "))}  # "3 completed, ..., 4 total"


def test_interrupted_sweep_every_view_agrees_and_resume_finishes_without_repeats(tmp_path, capsys):
    st = str(tmp_path)
    argv = [
        sys.executable,
        "-m",
        "sweeper.cli",
        "run",
        "--theta",
        "0.1",
        "--kappa",
        "0",  # four seeds, not four kappas: a penalised epoch costs 2-3x (the double backward), beside the point here
        "--seeds",
        "4",
        "--epochs",
        "3",
        "--set",
        "hessian_samples=50",
        "--set",
        "hessian_iterations=6",
        "--set",
        "hessian_top_k=3",
        "--set",
        "geometry=false",
        "--max-concurrent",
        "1",
        "--name",
        "i",
        "--storage",
        st,
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, deadline = [], time.monotonic() + 300
    try:
        for line in proc.stdout:
            lines.append(line)
            if "[1/4 done]" in line:  # one trial finished, the second has started
                break
            assert time.monotonic() < deadline, "".join(lines)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines) + rest
    assert "Traceback" not in driver_text(text), text
    assert proc.returncode == 130, text  # a script sees that the sweep did not finish
    ran = _counts(text, "i")
    assert ran["total"] == 4 and ran["completed"] >= 1 and ran["completed"] < 4, text
    assert "sweeper resume i" in text
    for library_line in ("Tuner.restore", "Resume experiment with", " WARNING ", " INFO "):  # Ray's advice is
        assert library_line not in driver_text(text), (library_line, text)  # for Python users: it goes to the log
    assert "Tuner.restore" in (tmp_path / "i" / "sweeper.log").read_text()

    code, out, _ = cli(["status", "i", "--storage", st], capsys)
    status = _counts(out, "i")
    for k in ("completed", "interrupted", "pending", "failed"):
        assert status[k] == ran[k], (k, status, ran)
    code, out, err = cli(["report", "i", "--storage", st], capsys)
    assert code == 0, err
    csv = pd.read_csv(tmp_path / "i-report" / "results.csv")
    assert len(csv) == 4 and (csv["status"] == "completed").sum() == ran["completed"]
    summary = (tmp_path / "i-report" / "summary.md").read_text()
    assert "4 trials" in summary and ("pending" in summary or "interrupted" in summary)

    code, out, err = cli(["resume", "i", "--storage", st], capsys)
    assert code == 0, err
    assert "4 completed, 0 diverged, 0 failed, 0 interrupted, 0 pending" in out
    for library_line in ("Tuner.restore", "Failed to fetch metrics", " WARNING ", " INFO "):
        assert library_line not in out + err, (library_line, out + err)
    first = next(ln for ln in out.splitlines() if "done]" in ln)
    assert first.startswith(f"[{ran['completed']}/4 done]"), out  # the trials finished before count from the start
    df = load_results("i", st, source="mlflow")
    assert len(df) == 4 and df["trial_key"].is_unique
    for tdir in (tmp_path / "i").glob("trial_*"):  # no step reported twice
        epochs = [json.loads(ln).get("epoch") for ln in (tdir / "result.json").read_text().splitlines() if ln.strip()]
        assert epochs == sorted(set(epochs)), (tdir.name, epochs)


def test_a_trial_that_finished_before_ray_recorded_its_end_is_neither_rerun_nor_reported_twice(tmp_path, capsys):
    """Ray saves its experiment state after each checkpoint, so a driver killed right after a trial's
    final report leaves that report, its checkpoint and the trial still RUNNING in the saved state.
    Put the finished sweep's state back to that and resume."""
    st = str(tmp_path)
    code, _, err = cli(
        [
            "run",
            "--theta",
            "0.1",
            "--kappa",
            "0",
            "--epochs",
            "2",
            "--set",
            "hessian=false",
            "--set",
            "geometry=false",
            "--name",
            "f",
            "--storage",
            st,
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    (state,) = (tmp_path / "f").glob("experiment_state-*.json")
    saved = json.loads(state.read_text())
    trial = json.loads(saved["trial_data"][0][0])
    assert trial["status"] == "TERMINATED"
    saved["trial_data"][0][0] = json.dumps({**trial, "status": "RUNNING"})
    state.write_text(json.dumps(saved))
    (tdir,) = (tmp_path / "f").glob("trial_*")
    before = (tdir / "result.json").read_text()
    ray.shutdown()
    code, out, err = cli(["resume", "f", "--storage", st], capsys)
    assert code == 0 and "1 completed, 0 diverged, 0 failed, 0 interrupted, 0 pending" in out, out + err
    assert (tdir / "result.json").read_text() == before  # the final report is not written a second time
    assert not (tdir / "error.txt").exists()
    df = load_results("f", st, source="mlflow")
    assert len(df) == 1 and df.iloc[0]["status"] == "completed"


def test_bad_inputs_of_reading_commands_exit_2_quickly(tmp_path, capsys):
    t0 = time.monotonic()
    code, _, err = cli(
        ["frontier", "nosuch", "--storage", str(tmp_path), "--source", "mlflow", "--mlflow-uri", "http://127.0.0.1:1"],
        capsys,
    )
    assert code == 2 and "unreachable" in err and len(err.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 30  # checked first, not minutes of MLflow retries
    from analysis.results import load_history
    from trainables.config import SweeperError

    t0 = time.monotonic()
    with pytest.raises(SweeperError, match="unreachable"):  # the library's readers check first too
        load_history("nosuch", str(tmp_path), mlflow_uri="http://127.0.0.1:1")
    assert time.monotonic() - t0 < 30
    code, _, err = cli(["run", "--lr", "0.01"], capsys)
    assert code == 2 and "use --set lr=0.01" in err


def test_ctrl_c_of_a_trial_exits_130_and_says_the_checkpoint_resumes(tmp_path):
    ck = tmp_path / "t.pt"
    argv = [
        sys.executable,
        "-m",
        "sweeper.cli",
        "trial",
        "--epochs",
        "500",
        "--no-hessian",
        "--no-geometry",
        "--checkpoint",
        str(ck),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ck.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in driver_text(err), err
    assert err.strip().splitlines()[-1].startswith(f"sweeper: trial interrupted; the checkpoint {ck}")


def test_the_same_config_gives_the_same_numbers_in_trial_and_in_a_sweep(tmp_path, capsys):
    st = str(tmp_path)
    code, _, err = cli(
        [
            "run",
            "--theta",
            "0.1",
            "--kappa",
            "50",
            "--epochs",
            "2",
            "--set",
            "hessian=false",
            "--set",
            "geometry=false",
            "--name",
            "one",
            "--storage",
            st,
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    swept = load_results("one", st, source="mlflow").iloc[0]
    out = tmp_path / "t.json"
    code, _, err = cli(
        [
            "trial",
            "--theta",
            "0.1",
            "--kappa",
            "50",
            "--epochs",
            "2",
            "--no-hessian",
            "--no-geometry",
            "--json",
            str(out),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    alone = json.loads(out.read_text())
    assert alone["config"]["threads"] == swept["threads"] == 1
    assert alone["metrics"]["clean_acc"] == swept["clean_acc"] and alone["metrics"]["asr"] == swept["asr"]
    assert alone["metrics"]["train_loss"] == pytest.approx(swept["train_loss"], rel=1e-12)
    assert set(CONFIG_FIELDS) >= set(alone["config"])


def test_a_sweep_stored_at_a_file_uri_runs_and_is_read_back(tmp_path, capsys):
    uri = (tmp_path / "remote").as_uri()  # file:///...: read through pyarrow like s3:// or gs://
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out, err = cli(
        [
            "run",
            "--theta",
            "0.1",
            "--kappa",
            "0,50",
            *FAST,
            "--name",
            "u",
            "--storage",
            uri,
            "--mlflow-uri",
            db,
            "--quiet",
        ],
        capsys,
    )
    assert code == 0 and "2 completed" in out, err
    assert read_meta(uri, "u").mlflow_uri == db
    code, out, err = cli(["frontier", "u", "--storage", uri], capsys)
    assert code == 0 and "of 2 completed trials" in out, err
    code, out, err = cli(["frontier", "u", "--storage", uri, "--source", "ray"], capsys)
    assert code == 0 and "of 2 completed trials" in out, err
    code, out, err = cli(["report", "u", "--storage", uri, "--out", str(tmp_path / "rep")], capsys)
    assert code == 0 and (tmp_path / "rep" / "summary.md").is_file(), err
    code, out, _ = cli(["status", "u", "--storage", uri], capsys)
    assert code == 0 and "2 completed" in out


def test_only_rays_sigterm_noise_is_forgiven():
    noise = (
        "\x1b[36m(trainable pid=7)\x1b[0m Exception ignored in: <function WeakSet._remove>\n"
        "\x1b[36m(trainable pid=7)\x1b[0m Traceback (most recent call last):\n"
        '\x1b[36m(trainable pid=7)\x1b[0m   File "ray/_private/worker.py", line 1063, in sigterm_handler\n'
        "\x1b[36m(trainable pid=7)\x1b[0m SystemExit: 1\n"
    )
    assert driver_text("done\n" + noise + "after\n") == "done\nafter\n"
    ours = noise.replace("sigterm_handler", "train_epoch")
    assert "Traceback" in driver_text(ours)  # any other worker traceback still fails a test


@pytest.mark.parametrize(
    "seeds, sets, file_seeds",
    [("2", [], None), ("0,1", [], None), ("1", [], None), (None, ["seed=0,1"], None), (None, [], 2)],
)
def test_every_way_of_giving_seeds_makes_one_seed_column(seeds, sets, file_seeds, tmp_path):
    """Item 1 of issue 15 for each spelling: --seeds N, --seeds a,b, --seeds 1, --set seed=..., a file's seeds."""
    from analysis.frontier import sweep_summary  # not analysis.report: no matplotlib for a printed table
    from sweeper.spaces import build_spec
    from sweeper.states import label_axes
    from trainables.record import SweepMeta

    sweep_file = None
    if file_seeds is not None:
        sweep_file = tmp_path / "s.yaml"
        sweep_file.write_text(f"grid:\n  kappa: [0, 100]\nseeds: {file_seeds}\n")
    flags = {"kappa": None if sweep_file else "0,100"}
    spec, _ = build_spec(sweep_file, flags, seeds, sets)
    configs = spec.configs()
    meta = SweepMeta(name="s", storage=str(tmp_path), mlflow_uri="", spec=spec.to_dict(), n_trials=len(configs))
    axes = label_axes(meta)
    assert len(axes) == len(set(axes)) and "kappa" in axes
    assert "seed" in axes or len({c.seed for c in configs}) == 1
    rows = [{**c.to_dict(), "status": "completed", "clean_acc": 0.9, "asr": 0.1} for c in configs]
    text = sweep_summary(rows, axes + ["seed"])  # the caller's list may repeat seed: still one column
    assert text.splitlines()[0].split().count("seed") <= 1


def test_a_sweep_over_defence_families_draws_one_frontier_labelled_by_family(tmp_path, capsys):
    """defence_filter x kappa in one grid: the frontier names each point's family, cost is a third objective."""
    st = str(tmp_path)
    argv = ["run", "--theta", "0.1", "--kappa", "0,100", "--set", "defence_filter=none,ss", *FAST]
    code, out, err = cli([*argv, "--set", "hessian=false", "--name", "fam", "--storage", st, "--quiet"], capsys)
    assert code == 0, err
    assert "4 completed" in out
    df = load_results("fam", st, source="mlflow")
    assert sorted(df["defence_family"]) == ["filter ss", "filter ss + penalty", "none", "penalty"]
    filtered = df[df["defence_filter"] == "ss"]
    assert filtered["pre_filter_asr"].notna().all() and filtered["filter_removed"].gt(0).all()
    assert df[df["defence_filter"] == "none"]["filter_removed"].isna().all()  # trained once, as always
    meta = read_meta(st, "fam")
    run = filtered["run_id"].iloc[0]
    path = MlflowClient(meta.mlflow_uri).download_artifacts(run, "filter.json", str(tmp_path))
    removed = json.loads(Path(path).read_text())["removed"]
    assert len(removed) == filtered["filter_removed"].iloc[0]  # which samples went, kept with the run
    code, out, err = cli(
        ["frontier", "fam", "--storage", st, "--objectives", "clean_acc:max,asr:min,train_seconds:min"], capsys
    )
    assert code == 0, err
    assert "(clean_acc max, asr min, train_seconds min)" in out and "defence_family" in out.splitlines()[1]
    assert "each defence family's best" in out and "filter ss + penalty" in out.split("each defence family")[1]
    code, out, err = cli(["report", "fam", "--storage", st], capsys)
    assert code == 0, err
    assert "defence_family" in pd.read_csv(tmp_path / "fam-report" / "results.csv").columns


def test_a_stale_ray_cluster_file_does_not_hold_a_local_sweep(tmp_path, capsys):
    """A head killed without `ray stop` leaves /tmp/ray/ray_current_cluster behind; a bare ray.init() joins the
    address it names and waits minutes on a dead GCS. A local sweep starts its own instance instead."""
    f = Path("/tmp/ray/ray_current_cluster")  # where ray.init() looks for a running head
    old = f.read_text() if f.exists() else None
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("192.0.2.1:6379")  # TEST-NET-1: nothing answers there
    try:
        t0 = time.monotonic()
        argv = [
            "run",
            "--theta",
            "0.1",
            "--kappa",
            "0",
            *FAST,
            "--set",
            "hessian=false",
            "--name",
            "st",
            "--storage",
            str(tmp_path),
        ]
        code, out, err = cli([*argv, "--quiet"], capsys)
        assert code == 0 and "1 completed" in out, err
        assert time.monotonic() - t0 < 120
    finally:
        if old is None:
            f.unlink(missing_ok=True)
        else:
            f.write_text(old)
