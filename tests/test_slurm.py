"""Sweeps on SLURM (sweeper.slurm): the job script, the bad inputs of ``--slurm``, and sweeps submitted to a
real SLURM (munged, slurmctld and two slurmd on 127.0.0.1, :mod:`tests.slurm_cluster`): two jobs at once,
a job requeued mid-sweep, a job held in the queue."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, missing

from sweeper.cli import main
from sweeper.slurm import (
    PORT_BLOCKS,
    SlurmOptions,
    cli_params,
    cpus_per_node,
    job_ports,
    job_script,
    restore_params,
)

TINY = ["--epochs", "1", "--theta", "0.05", "--kappa", "0,100"]  # the 2-trial digits sweep


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# --- without SLURM ----------------------------------------------------------------------------------


def test_job_script_is_valid_bash_with_every_option(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEPER_PLUGINS", "my_plugin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    opts = SlurmOptions(
        nodes=3, time="1-02:00:00", partition="gpu", gpus_per_node=2, sbatch_args=["--qos=long", "--mail-type=END"]
    )
    text = job_script("s", str(tmp_path / "my sweeps"), opts, workdir=str(tmp_path))
    path = tmp_path / "job.sbatch"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    sbatch = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    for want in (
        "--nodes=3",
        "--time=1-02:00:00",
        "--partition=gpu",
        "--gpus-per-node=2",
        "--exclusive",
        "--requeue",
        "--signal=B:USR2@300",
        "--qos=long",
        "--mail-type=END",
        "--open-mode=append",
    ):
        assert any(ln.endswith(want) for ln in sbatch), want
    assert f"exec {sys.executable} -m sweeper.cli slurm-job s --storage '{tmp_path / 'my sweeps'}'" in text
    assert "export SWEEPER_PLUGINS=my_plugin" in text and "secret" not in text  # imports yes, credentials never
    assert "--cpus-per-task=4" in job_script("s", str(tmp_path), SlurmOptions(cpus_per_node=4), str(tmp_path))


def test_ports_of_two_jobs_never_collide_and_nodes_of_one_job_differ():
    # any two jobs whose ids differ by less than PORT_BLOCKS, and any node indices: no shared port
    for a, b in ((1, 2), (7, 7 + PORT_BLOCKS - 1), (12345, 12346), (799, 800)):
        ports_a = {p for i in range(4) for p in job_ports(a, i).values()}
        ports_b = {p for i in range(4) for p in job_ports(b, i).values()}
        assert not ports_a & ports_b, (a, b)
    one_job = [job_ports(42, i)["agent_listen"] for i in range(40)]
    assert len(set(one_job)) == 40
    assert all(1024 < p < 65536 for i in range(3) for p in job_ports(799, i).values())


def test_cpus_per_node_reads_slurms_format():
    assert cpus_per_node("2(x3),1", 4) == [2, 2, 2, 1]
    assert cpus_per_node("16", 1) == [16]
    with pytest.raises(Exception, match="names 2 nodes; the job has 3"):
        cpus_per_node("2(x2)", 3)


def test_cli_params_round_trip_restores_enums_and_paths():
    from sweeper.cli.sweeps import Sampler, search
    from sweeper.cli.sweeps import run as run_cmd

    plain = cli_params(search, {"sampler": Sampler.tpe, "budget": 3, "slurm": True}, drop=("slurm",))
    assert plain == {"sampler": "tpe", "budget": 3}
    assert json.loads(json.dumps(plain)) == plain
    back = restore_params(search, plain)
    assert back["sampler"] is Sampler.tpe and back["budget"] == 3
    assert restore_params(run_cmd, {"sweep_file": "a/b.yaml"})["sweep_file"] == Path("a/b.yaml")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["run", "--nodes", "2"], "--nodes is a SLURM option: add --slurm"),
        (["run", "--slurm", "--time", "soon"], "--time='soon' is invalid: use MINUTES"),
        (["run", "--slurm", "--nodes", "0"], "--nodes=0 is invalid: must be >= 1"),
        (["run", "--slurm", "--address", "127.0.0.1:1"], "--address 127.0.0.1:1 and --slurm exclude each other"),
        (["run", "--slurm", "--cpus-per-trial", "4", "--cpus-per-node", "2"], "no node of the job could run a trial"),
        (["run", "--slurm", "--gpus-per-trial", "1"], "needs GPUs in the job: add --gpus-per-node"),
        (["run", "--slurm", "--sbatch-arg", "qos=long"], "--sbatch-arg='qos=long' is invalid"),
        (["search", "--slurm", "--partition", "a b"], "--partition='a b' is invalid"),
        (["search", "--slurm", "--objectives", "nope:max"], "nope"),
        (["run", "--slurm", "--storage", "s3://bucket/sweeps"], "--slurm needs a folder every node mounts"),
        (["resume", "nope", "--slurm"], "no sweep 'nope'"),
    ],
)
def test_bad_slurm_input_is_one_line_exit_2_and_writes_nothing(argv, needle, tmp_path, capsys):
    storage = tmp_path / "sweeps"
    where = [] if "--storage" in argv else ["--storage", str(storage)]
    code, _, err = run([*argv, *where, *(["--name", "s"] if argv[0] == "run" else [])], capsys)
    if "no sweep" in needle and "sbatch is not on PATH" in err:
        pytest.skip("sbatch is not installed: --slurm stops at that check, before the sweep's")
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (storage / "s").exists()


def test_without_sbatch_on_path_nothing_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # this Python, no SLURM
    storage = tmp_path / "sweeps"
    code, _, err = run(["run", "--slurm", *TINY, "--name", "s", "--storage", str(storage)], capsys)
    assert code == 2
    assert (
        err.strip() == "sweeper: error: --slurm: sbatch is not on PATH: run this on a SLURM login node, or drop --slurm"
    )
    assert not (storage / "s").exists()


# --- on a real SLURM ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = missing()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(cluster.conf))  # submissions (sbatch) and the jobs they start see this SLURM
    yield cluster
    mp.undo()
    cluster.stop()


def _submit(argv, capsys) -> str:
    t0 = time.monotonic()
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert time.monotonic() - t0 < 30, "a submission returns within seconds"
    m = re.search(r"submitted SLURM job (\d+)", out)
    assert m, out
    return m.group(1)


def _epochs(log: str, total: int) -> dict[str, list[int]]:
    """The epochs each trial (by kappa) reported in a job's progress lines."""
    out: dict[str, list[int]] = {}
    for kappa, epoch in re.findall(rf"kappa=(\S+) epoch (\d+)/{total}\b", log):
        out.setdefault(kappa, []).append(int(epoch))
    return out


def _ray_left(job_id: str) -> list[str]:
    """Processes of the job's Ray still alive (its per-node temp folders are in their command lines)."""
    out = subprocess.run(["pgrep", "-af", f"/tmp/sweeper-{job_id}-"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if "pgrep" not in ln]


def _runs(db: Path, experiment: str) -> list[dict]:
    with sqlite3.connect(db) as c:
        rows = c.execute(
            "select r.run_uuid, "
            "(select value from tags t where t.run_uuid = r.run_uuid and t.key = 'sweeper.kind'), "
            "(select value from tags t where t.run_uuid = r.run_uuid and t.key = 'sweeper.ray_node') "
            "from runs r join experiments e on e.experiment_id = r.experiment_id where e.name = ?",
            (experiment,),
        ).fetchall()
        steps = {
            run: sorted(
                s for (s,) in c.execute("select step from metrics where run_uuid=? and key='train_loss'", (run,))
            )
            for run, *_ in rows
        }
    return [{"run": r, "kind": k, "node": n, "steps": steps[r]} for r, k, n in rows]


@pytest.mark.skipif(missing() is not None, reason=missing() or "")
@pytest.mark.xdist_group("slurm")
def test_bad_partition_is_one_line_and_leaves_no_sweep_folder(slurm, tmp_path, capsys):
    storage = tmp_path / "sweeps"
    code, _, err = run(
        ["run", "--slurm", "--partition", "nope", *TINY, "--name", "s", "--storage", str(storage)], capsys
    )
    assert code == 2
    assert "SLURM refuses the job: invalid partition specified: nope" in err and len(err.strip().splitlines()) == 1
    assert not (storage / "s").exists()


@pytest.mark.skipif(missing() is not None, reason=missing() or "")
@pytest.mark.xdist_group("slurm")
def test_two_sweeps_submitted_at_once_both_finish_on_both_ray_nodes(slurm, tmp_path, capsys):
    storage = tmp_path / "sweeps"
    jobs = {
        name: _submit(
            [
                "run",
                "--slurm",
                "--nodes",
                "2",
                "--cpus-per-node",
                "1",
                *TINY,
                "--name",
                name,
                "--storage",
                str(storage),
            ],
            capsys,
        )
        for name in ("s1", "s2")
    }
    for name in jobs:
        script = storage / name / "slurm" / "job.sbatch"
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    ended = {
        name: slurm.wait(j, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300) for name, j in jobs.items()
    }
    for name, job in ended.items():
        log = (storage / name / "slurm" / f"job-{jobs[name]}.log").read_text()
        assert job["JobState"] == "COMPLETED", log
        assert "Ray on 2 nodes (n1, n2)" in log
    # both jobs held the nodes at the same time (1 CPU of each node each)
    s1, s2 = ended["s1"], ended["s2"]
    assert s1["StartTime"] < s2["EndTime"] and s2["StartTime"] < s1["EndTime"]

    code, out, err = run(["status", "s1", "--storage", str(storage)], capsys)
    assert code == 0, err
    assert "2 completed" in out and f"SLURM job {jobs['s1']}: COMPLETED on n[1-2]" in out
    code, out, err = run(["frontier", "s1", "--storage", str(storage)], capsys)
    assert code == 0 and "kappa" in out, err
    for name in jobs:
        trials = [r for r in _runs(storage / "mlflow.db", name) if r["kind"] == "trial"]
        assert len(trials) == 2 and all(r["steps"] == [1] for r in trials)
        assert len({r["node"] for r in trials}) == 2, "one trial on each Ray node"
        assert _ray_left(jobs[name]) == []
        assert not list((storage / name / "slurm").glob("ray-token-*")), "the job's token goes with its Ray"


@pytest.mark.skipif(missing() is not None, reason=missing() or "")
@pytest.mark.xdist_group("slurm")
def test_a_job_warned_of_its_end_requeues_and_resumes_without_rerunning(slurm, tmp_path, capsys):
    storage = tmp_path / "sweeps"
    argv = ["run", "--slurm", "--nodes", "2", "--cpus-per-node", "1", "--epochs", "6", "--theta", "0.05"]
    job = _submit([*argv, "--kappa", "0,100", "--name", "rq", "--storage", str(storage)], capsys)
    log = storage / "rq" / "slurm" / f"job-{job}.log"
    deadline = time.monotonic() + 180

    # every trial has reported two epochs: a stop now leaves each a checkpoint past its first epoch
    def ready() -> bool:
        seen = _epochs(log.read_text() if log.exists() else "", 6)
        return seen.keys() == {"0", "100"} and min(map(max, seen.values())) >= 2

    while not ready():
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.5)
    code, _, err = run(["resume", "rq", "--storage", str(storage), "--slurm"], capsys)
    assert code == 2 and f"is in SLURM job {job} (RUNNING)" in err, err
    code, out, _ = run(["status", "rq", "--storage", str(storage)], capsys)
    assert f"SLURM job {job}: RUNNING on n[1-2]" in out and re.search(r"latest: \[\d/2 done\] kappa=", out), out

    # what SLURM sends WARNING_SECONDS before the time limit (--signal=B:USR2@300), sent now
    assert slurm.run("scancel", "--signal=USR2", "--batch", job).returncode == 0
    pending = slurm.wait(job, ("PENDING",), timeout=120)
    assert pending["Restarts"] == "1"
    before = log.read_text()
    assert "SLURM sent SIGUSR2" in before and f"requeued job {job}" in before
    # SLURM starts a requeued job again once the old job's credential has expired (cred_expire: 10 s here,
    # 120 s by default); releasing it sooner (scontrol update StartTime=now) fails it: "Job credential revoked"
    done = slurm.wait(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=300)
    text = log.read_text()
    assert done["JobState"] == "COMPLETED", text
    after = text[len(before) :]
    was, now = _epochs(before, 6), _epochs(after, 6)
    # each trial paused at the end of an epoch (its checkpoint): it goes on with the next one, none trained twice
    for kappa, epochs in now.items():
        assert min(epochs) == max(was[kappa]) + 1, (kappa, was, now)
    assert now and "2 completed" in after, after

    runs = _runs(storage / "mlflow.db", "rq")
    assert sorted(r["kind"] for r in runs) == ["sweep", "trial", "trial"], "no duplicate MLflow run"
    assert all(r["steps"] == [1, 2, 3, 4, 5, 6] for r in runs if r["kind"] == "trial"), "each epoch logged once"
    info = json.loads((storage / "rq" / "slurm" / "job.json").read_text())
    assert [s["restart"] for s in info["starts"]] == [0, 1]
    code, out, _ = run(["status", "rq", "--storage", str(storage)], capsys)
    assert "2 completed" in out and f"SLURM job {job}: COMPLETED (restarts 1)" in out
    assert _ray_left(job) == []


@pytest.mark.skipif(missing() is not None, reason=missing() or "")
@pytest.mark.xdist_group("slurm")
def test_a_held_job_shows_in_status_and_a_cancelled_one_can_be_submitted_again(slurm, tmp_path, capsys):
    storage = tmp_path / "sweeps"
    job = _submit(["run", "--slurm", "--sbatch-arg=--hold", *TINY, "--name", "h", "--storage", str(storage)], capsys)
    assert "#SBATCH --hold" in (storage / "h" / "slurm" / "job.sbatch").read_text()
    code, out, _ = run(["status", "h", "--storage", str(storage)], capsys)
    assert code == 0 and f"sweep h: not started yet; SLURM job {job}: PENDING" in out
    code, _, err = run(["run", *TINY, "--name", "h", "--storage", str(storage)], capsys)
    assert code == 2 and f"waits in SLURM job {job} (PENDING)" in err
    assert slurm.run("scancel", job).returncode == 0
    slurm.wait(job, ("CANCELLED",), timeout=30)
    code, _, err = run(["run", *TINY, "--name", "h", "--storage", str(storage)], capsys)
    assert code == 2 and "ended (cancelled) before the sweep started" in err and "--slurm" in err
    again = _submit(["resume", "h", "--storage", str(storage), "--slurm", "--sbatch-arg=--hold"], capsys)
    assert again != job
    info = json.loads((storage / "h" / "slurm" / "job.json").read_text())
    assert info["command"] == "run" and [j["id"] for j in info["jobs"]] == [job, again]
    assert (storage / "h" / "slurm" / f"job-{job}.sbatch").exists(), "the first script is kept"
    assert slurm.run("scancel", again).returncode == 0


def test_a_damaged_job_json_is_one_line(tmp_path, capsys):
    folder = tmp_path / "s" / "slurm"
    folder.mkdir(parents=True)
    (folder / "job.json").write_text("{not json")
    code, _, err = run(["status", "s", "--storage", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{folder / 'job.json'} is unreadable" in err
