"""A real SLURM on 127.0.0.1 for the tests: munged, slurmctld and two slurmd (nodes n1, n2), each a
plain background process from a private configuration, stopped by its PID.

No systemd and no cgroups (``proctrack/linuxproc``, ``task/none``), no accounting. Both nodes are this
host, at different ports, with 2 CPUs each. Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and
``munge`` packages provide the binaries (``.ci/run`` installs them when it runs as root).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from sweeper.slurm import PORT_BLOCKS

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")


def missing() -> str | None:
    """Why this machine cannot run the test SLURM (None: it can)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "the test SLURM runs slurmd, which needs root"
    absent = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if absent:
        return f"SLURM or munge is not installed ({', '.join(absent)} missing; apt-get install slurmctld slurmd slurm-client munge)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """Start with :meth:`start`, stop with :meth:`stop`; :attr:`env` is what a SLURM command needs."""

    def __init__(self, root: Path, nodes: int = 2, cpus: int = 2):
        import random

        self.root, self.nodes, self.cpus = Path(root), nodes, cpus
        # job ids of their own: the jobs' Ray folders (/tmp/sweeper-<id>-<node>) are this cluster's to remove.
        # A job's Ray ports come from its id modulo 800 (sweeper.slurm.job_ports): each test process's cluster
        # starts at its own share of the 800 blocks (a test submits far fewer jobs than a share holds), so two
        # clusters' jobs never take each other's ports.
        # (They did: with pytest 9.2, xdist's loadgroup stopped grouping, pytest-xdist#1386, the SLURM tests
        # ran in both processes, and ids drawn in steps of 1000 gave two clusters' jobs the same GCS port.)
        workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
        index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % workers
        self.first_job = PORT_BLOCKS * random.randrange(125, 5000) + PORT_BLOCKS // workers * index
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pid_files: list[Path] = []

    def _config(self) -> str:
        r = self.root
        names = [f"n{i + 1}" for i in range(self.nodes)]
        lines = [
            "ClusterName=sweepertest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            "AuthType=auth/munge",
            # cred_expire: also how long a requeued job waits before it may start again (default 120 s)
            f"AuthInfo=socket={r}/munge/sock,cred_expire=10",
            "CredType=cred/munge",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool-%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2",
            "JobRequeue=1",
            f"FirstJobId={self.first_job}",
            "MinJobAge=3600",
            "KillWait=10",
            *(f"NodeName={n} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={self.cpus} State=UNKNOWN" for n in names),
            f"PartitionName=debug Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
        return "\n".join(lines)

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        r = self.root
        (r / "munge").mkdir(parents=True, mode=0o700)
        (r / "state").mkdir()
        key = r / "munge" / "munge.key"
        subprocess.run([_exe("mungekey"), "-c", "-k", str(key)], check=True, capture_output=True)
        key.chmod(0o400)
        m = r / "munge"
        subprocess.run(
            [
                _exe("munged"),
                "--force",
                f"--key-file={key}",
                f"--socket={m / 'sock'}",
                f"--pid-file={m / 'munged.pid'}",
                f"--log-file={m / 'munged.log'}",
                f"--seed-file={m / 'seed'}",
            ],
            check=True,
            capture_output=True,
        )
        self.pid_files.append(m / "munged.pid")
        self.conf.write_text(self._config())
        subprocess.run([_exe("slurmctld"), "-i"], check=True, env=self.env, capture_output=True)
        self.pid_files.append(r / "slurmctld.pid")
        for i in range(self.nodes):
            subprocess.run([_exe("slurmd"), "-N", f"n{i + 1}"], check=True, env=self.env, capture_output=True)
            self.pid_files.append(r / f"slurmd-n{i + 1}.pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # every node idle: jobs can start
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%T %D"], env=self.env, capture_output=True, text=True, timeout=10
            ).stdout.split()
            if out[:1] == ["idle"] and out[1:2] == [str(self.nodes)]:
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the test SLURM's nodes did not come up within {timeout:.0f} s (logs in {r})")

    def stop(self) -> None:
        """Cancel every job still queued or running (a failed test's), wait (bounded) until none is left,
        remove the jobs' Ray folders, then stop every daemon by its PID (slurmd first, munged last)."""
        if self.pid_files:
            try:
                self.run("scancel", "--full", f"--user={os.getuid()}", timeout=10)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.run("squeue", "-h", timeout=10).stdout.strip():
                    time.sleep(0.5)
            except (OSError, subprocess.TimeoutExpired):
                pass  # slurmctld is gone: nothing left to cancel through it
        for folder in Path("/tmp").glob("sweeper-*-*"):
            job = folder.name.split("-")[1]
            if job.isdigit() and self.first_job <= int(job) < self.first_job + 1000:
                shutil.rmtree(folder, ignore_errors=True)
        for pid_file in reversed(self.pid_files):
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)

    def run(self, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
        """A SLURM command against this cluster."""
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        """Wait (bounded) until the job is in one of ``states``; its fields then."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.get("JobState") in states:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {job.get('JobState')}, not {states}, after {timeout:.0f} s")
            time.sleep(0.5)
