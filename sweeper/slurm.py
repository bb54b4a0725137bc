"""Sweeps inside a SLURM allocation: the job script, its submission, Ray across the job's nodes,
SLURM's warning before the end of the job, and the requeue that resumes the sweep.

``sweeper run|search|resume --slurm`` validates everything as without it, then writes
``<storage>/<name>/slurm/job.sbatch`` (readable, editable, submittable by hand) and ``job.json``
(the command and its parameters, the submissions, each start of the job), submits the script with
``sbatch`` and returns. The job runs ``python -m sweeper.cli slurm-job NAME --storage STORAGE``
(:func:`run_job`), with the interpreter and environment that submitted it:

- a Ray head on the job's first node and a worker on every other node (``srun --overlap``), each
  stopped by the job through the ``srun`` that started it (never ``ray stop``: it stops every Ray
  process on a host, other jobs' too);
- token authentication with a per-job token file (mode 600) beside the job script;
- ports derived from the job id (:func:`job_ports`), so two jobs sharing a node never collide, and a
  short per-node temporary folder (Unix socket paths must stay under 108 characters);
- a bounded wait for every node before the first trial;
- then the sweep itself: its first start, or ``resume`` when the sweep's ``sweeper.json`` exists
  (a requeued job, a ``sweeper resume --slurm``).

The script asks SLURM for ``SIGUSR2`` :data:`WARNING_SECONDS` before the time limit
(``--signal=B:USR2@...``). On it the job stops the trials (each continues from its last epoch's
checkpoint), stops Ray and requeues itself (``scontrol requeue``); the requeued job resumes the sweep.
``SIGTERM`` (``scancel``, a preemption) stops the same way without requeueing. A finished sweep never
requeues.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainables.config import SweeperError

SLURM_DIR = "slurm"  # <storage>/<name>/slurm/: the job script, job.json, the job's and Ray nodes' logs
JOB_SCRIPT = "job.sbatch"
JOB_JSON = "job.json"
WARNING_SECONDS = 300  # SIGUSR2 this long before the time limit (SLURM delivers it within a minute)
# USR2, not the customary USR1: Ray Tune takes SIGUSR1 for itself during fit() (a stop with no requeue)
COMMAND_TIMEOUT = 20.0  # a SLURM command (sbatch, scontrol) that has not answered by then: slurmctld is unreachable
HEAD_WAIT = 90.0  # the Ray head's port must answer within this
NODES_WAIT = 120.0  # every node of the job must have joined Ray within this
STOP_GRACE = WARNING_SECONDS - 120  # on the warning, trials get this long to end their epoch; then Ctrl-C's stop
STOP_WAIT = 30.0  # a Ray node's srun gets this long to stop its processes before it is killed
PORT_BASE, PORT_BLOCK, PORT_BLOCKS = 20000, 50, 800  # job ports: 20000 + (job id mod 800) x 50, 50 per job
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUE_HOLD")
SWEEP_ENV = "SWEEPER_SLURM_SWEEP"  # set by the job script: the sweep folder its job may start in
_TIME = re.compile(  # sbatch's --time forms
    r"^(\d+-\d{1,2}(:\d{1,2}(:\d{1,2})?)?|\d+(:\d{1,2}(:\d{1,2})?)?|UNLIMITED|INFINITE)$", re.IGNORECASE
)


@dataclass
class SlurmOptions:
    """What a ``--slurm`` submission asks SLURM for (the CLI's ``--nodes`` ... ``--sbatch-arg``)."""

    nodes: int = 1
    time: str | None = None  # sbatch --time: MINUTES, M:S, H:M:S, D-H, D-H:M, D-H:M:S; None: the partition's
    partition: str | None = None  # None: the cluster's default partition
    gpus_per_node: int | None = None
    cpus_per_node: int | None = None  # None: whole nodes (--exclusive); Ray gets every CPU SLURM gives the job
    sbatch_args: list[str] = field(default_factory=list)  # written into the script verbatim, one #SBATCH line each

    def check(self, cpus_per_trial: float = 1.0, gpus_per_trial: float | None = None) -> None:
        """Each value alone and against the trial's resources; SLURM itself judges the rest (:func:`submit`)."""
        if self.nodes < 1:
            raise SweeperError(f"--nodes={self.nodes} is invalid: must be >= 1")
        if self.time is not None and not _TIME.match(self.time):
            raise SweeperError(
                f"--time={self.time!r} is invalid: use MINUTES, MM:SS, HH:MM:SS, DAYS-HH, DAYS-HH:MM, DAYS-HH:MM:SS "
                "or UNLIMITED"
            )
        if self.partition is not None and not re.fullmatch(r"[A-Za-z0-9._,-]+", self.partition):
            raise SweeperError(f"--partition={self.partition!r} is invalid: expected a SLURM partition name")
        for flag, v in (("--gpus-per-node", self.gpus_per_node), ("--cpus-per-node", self.cpus_per_node)):
            if v is not None and v < (0 if flag == "--gpus-per-node" else 1):
                raise SweeperError(f"{flag}={v} is invalid: must be >= {0 if flag == '--gpus-per-node' else 1}")
        for arg in self.sbatch_args:
            if not arg.startswith("-") or "\n" in arg:
                raise SweeperError(f"--sbatch-arg={arg!r} is invalid: expected one sbatch option, such as --qos=long")
        if self.cpus_per_node is not None and cpus_per_trial > self.cpus_per_node:
            raise SweeperError(
                f"--cpus-per-trial={cpus_per_trial:g} is more than --cpus-per-node={self.cpus_per_node}: "
                "no node of the job could run a trial"
            )
        if gpus_per_trial and not self.gpus_per_node:
            raise SweeperError(
                f"--gpus-per-trial={gpus_per_trial:g} needs GPUs in the job: add --gpus-per-node N (N >= 1)"
            )


def slurm_options(
    slurm: bool,
    nodes: int = 1,
    time: str | None = None,
    partition: str | None = None,
    gpus_per_node: int | None = None,
    cpus_per_node: int | None = None,
    sbatch_args: list[str] | None = None,
) -> SlurmOptions | None:
    """The CLI's SLURM flags as :class:`SlurmOptions`, or None without ``--slurm`` (then the others are refused)."""
    given = {
        "--nodes": nodes != 1,
        "--time": time is not None,
        "--partition": partition is not None,
        "--gpus-per-node": gpus_per_node is not None,
        "--cpus-per-node": cpus_per_node is not None,
        "--sbatch-arg": bool(sbatch_args),
    }
    if not slurm:
        stray = [k for k, v in given.items() if v]
        if stray:
            raise SweeperError(f"{stray[0]} is a SLURM option: add --slurm to submit the sweep as a SLURM job")
        return None
    return SlurmOptions(nodes, time, partition, gpus_per_node, cpus_per_node, list(sbatch_args or []))


# --- the job script and its submission ---------------------------------------------------------------


def job_script(name: str, storage: str, opts: SlurmOptions, workdir: str, python: str | None = None) -> str:
    """The batch script of a sweep's job (``bash -n`` clean): the ``#SBATCH`` lines, then one ``exec``."""
    python = python or sys.executable
    folder = Path(storage) / name
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        f"# sweeper: the SLURM job of sweep {name} (written by sweeper; `sbatch {folder / SLURM_DIR / JOB_SCRIPT}`",
        "# submits it again). It starts Ray on the job's nodes and runs the sweep, or resumes it when it has started.",
        f"#SBATCH --job-name=sweeper-{name}",
        f"#SBATCH --nodes={opts.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={opts.cpus_per_node}" if opts.cpus_per_node else "#SBATCH --exclusive",
    ]
    if opts.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={opts.gpus_per_node}")
    if opts.time:
        lines.append(f"#SBATCH --time={opts.time}")
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    lines += [
        f"#SBATCH --output={folder / SLURM_DIR}/job-%j.log",
        "#SBATCH --open-mode=append",  # a requeued job appends to its log
        f"#SBATCH --chdir={workdir}",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR2@{WARNING_SECONDS}",  # to this script's process (python, by exec): stop, requeue
        *(f"#SBATCH {a}" for a in opts.sbatch_args),
        "",
        # what the trials import, for a by-hand `sbatch` from another shell (sbatch passes the submitting
        # shell's environment on; tracking credentials come from there and are never written here)
        *(f"export {k}={q(os.environ[k])}" for k in ("PYTHONPATH", "SWEEPER_PLUGINS") if os.environ.get(k)),
        f"export {SWEEP_ENV}={q(str(folder))}",
        f"exec {q(python)} -m sweeper.cli slurm-job {q(name)} --storage {q(str(storage))}",
        "",
    ]
    return "\n".join(lines)


def _slurm(args: list[str], timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    """A SLURM command, bounded: one that does not answer is one line saying what it waited for."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SweeperError(
            f"`{' '.join(args[:2])}` did not answer within {timeout:.0f} s: is slurmctld reachable? (`sinfo` tells)"
        ) from None
    except FileNotFoundError:
        raise SweeperError(f"--slurm: {args[0]} is not on PATH: run this on a SLURM login node") from None


def _slurm_error(out: subprocess.CompletedProcess) -> str:
    """SLURM's own reason, without its prefixes: ``invalid partition specified: gpu``."""
    lines = [ln.strip() for ln in (out.stderr + "\n" + out.stdout).splitlines() if ln.strip()]
    lines = [re.sub(r"^(sbatch|scontrol|srun): (error: )?", "", ln) for ln in lines]
    lines = [ln for ln in lines if not ln.startswith(("Batch job submission failed", "allocation failure"))] or lines
    return "; ".join(dict.fromkeys(lines)) or f"exit code {out.returncode}"


def check_sbatch() -> str:
    """The sbatch on PATH, or one line saying there is none."""
    found = shutil.which("sbatch")
    if found is None:
        raise SweeperError("--slurm: sbatch is not on PATH: run this on a SLURM login node, or drop --slurm")
    return found


@dataclass
class Submission:
    """What :func:`submit` did: the job id, the script and where the job writes its log."""

    name: str
    job_id: str
    script: Path
    log: Path


def submit(
    command: str, params: dict[str, Any], name: str, storage: str, opts: SlurmOptions, workdir: str | None = None
) -> Submission:
    """Submit a validated sweep as a SLURM job running ``sweeper <command>`` with ``params``.

    ``sbatch --test-only`` judges the script first (partition, time, node count): a refusal is one
    line and nothing is left behind. Then the script and ``job.json`` are written to
    ``<storage>/<name>/slurm/`` (an earlier script is kept as ``job-<its job id>.sbatch``) and
    submitted. A sweep folder this call made is removed again when the submission fails.
    """
    check_sbatch()
    workdir = workdir or os.getcwd()
    text = job_script(name, storage, opts, workdir)
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
        f.write(text)
    try:
        out = _slurm(["sbatch", "--test-only", f.name])
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise SweeperError(f"--slurm: SLURM refuses the job: {_slurm_error(out)}")
    folder = Path(storage) / name
    made = not folder.exists()
    slurm_dir = folder / SLURM_DIR
    slurm_dir.mkdir(parents=True, exist_ok=True)
    before = read_job(folder)
    info = json.loads(json.dumps(before)) if before else {"jobs": [], "starts": []}
    script = slurm_dir / JOB_SCRIPT
    kept = slurm_dir / f"job-{info['jobs'][-1]['id']}.sbatch" if info["jobs"] else None
    if script.exists() and kept is not None:  # nothing written is lost: the last job's script keeps its id
        script.replace(kept)
    script.write_text(text)
    info.update(command=command, params=params, workdir=workdir, python=sys.executable, slurm=asdict(opts))
    _write_job(folder, info)
    out = _slurm(["sbatch", "--parsable", str(script)])
    if out.returncode != 0:
        if made:
            shutil.rmtree(folder, ignore_errors=True)
        elif before is not None:  # a resubmission that failed: the folder as it was
            if kept is not None and kept.exists():
                kept.replace(script)
            _write_job(folder, before)
        raise SweeperError(f"--slurm: sbatch failed: {_slurm_error(out)}")
    job_id = out.stdout.strip().split(";")[0]
    info["jobs"].append({"id": job_id, "command": command, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})
    _write_job(folder, info)
    return Submission(name, job_id, script, slurm_dir / f"job-{job_id}.log")


def read_job(folder: Path) -> dict[str, Any] | None:
    """The sweep's ``slurm/job.json`` (None: never submitted to SLURM)."""
    path = Path(folder) / SLURM_DIR / JOB_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SweeperError(f"{path} is unreadable ({e}): sweeper writes it; restore it or remove the folder") from None


def _write_job(folder: Path, info: dict[str, Any]) -> None:
    path = Path(folder) / SLURM_DIR / JOB_JSON
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(path)  # atomic: `sweeper status` never reads half a file


def job_state(job_id: str) -> dict[str, str]:
    """SLURM's view of a job: ``state`` (PENDING, RUNNING, COMPLETED, ...; ``gone`` once slurmctld has
    forgotten it), ``restarts`` and ``nodes``; ``state`` is ``unknown`` when SLURM cannot be asked."""
    try:
        out = _slurm(["scontrol", "show", "job", "-o", str(job_id)], timeout=10.0)
    except SweeperError:
        return {"state": "unknown"}
    if out.returncode != 0:
        return {"state": "gone" if "Invalid job id" in out.stderr + out.stdout else "unknown"}
    fields = dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)
    return {
        "state": fields.get("JobState", "unknown"),
        "restarts": fields.get("Restarts", "0"),
        "nodes": fields.get("NodeList", ""),
    }


def active_job(folder: Path) -> tuple[str, str] | None:
    """(job id, state) of the sweep's last SLURM job while it is pending or running, else None."""
    info = read_job(folder)
    if not info or not info.get("jobs"):
        return None
    job_id = info["jobs"][-1]["id"]
    state = job_state(job_id)["state"]
    if state in ACTIVE_STATES:
        return job_id, state
    return None


def status_line(folder: Path) -> str | None:
    """``SLURM job 12: RUNNING (restarts 1) on n[1-2]; log ...`` for ``sweeper status``; None: no job."""
    info = read_job(folder)
    if not info or not info.get("jobs"):
        return None
    job_id = info["jobs"][-1]["id"]
    st = job_state(job_id)
    state = {"gone": "ended (SLURM no longer lists it)", "unknown": "unknown (SLURM did not answer)"}.get(
        st["state"], st["state"]
    )
    extra = f" (restarts {st['restarts']})" if st.get("restarts", "0") != "0" else ""
    nodes = f" on {st['nodes']}" if st.get("nodes") and st["nodes"] != "(null)" else ""
    log = Path(folder) / SLURM_DIR / f"job-{job_id}.log"
    line = f"SLURM job {job_id}: {state}{extra}{nodes}; log {log}"
    if st["state"] == "RUNNING":  # where the sweep is now: the job's latest progress line
        last = _last_progress(log)
        line += f"\n  latest: {last}" if last else ""
    return line


def _last_progress(log: Path, tail: int = 65536) -> str | None:
    """The last progress line (``[3/8 done] ...``) in the end of a job's log."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    return next((ln.strip() for ln in reversed(lines) if re.match(r"\s*\[\d+/\d+ done\]", ln)), None)


def starting_in_job(storage: str, name: str) -> bool:
    """Whether this process is the sweep's own SLURM job starting it: the job script named this sweep's
    folder, which holds the job's files and no ``sweeper.json`` yet (any other existing folder is refused)."""
    from trainables.record import META

    folder = Path(storage) / name
    return os.environ.get(SWEEP_ENV) == str(folder) and (folder / SLURM_DIR).is_dir() and not (folder / META).exists()


def unstarted_job(storage: str, name: str) -> dict[str, Any] | None:
    """The ``job.json`` of a sweep whose SLURM job ended before it started the sweep (a folder with only
    SLURM's files), else None; a job of it still pending or running is one line."""
    from trainables.record import META

    folder = Path(storage) / name
    info = read_job(folder)
    if info is None or not info.get("jobs") or (folder / META).exists():
        return None
    job_id = info["jobs"][-1]["id"]
    state = job_state(job_id)["state"]
    if state in ACTIVE_STATES:
        raise SweeperError(f"sweep {name!r} waits in SLURM job {job_id} ({state}); `sweeper status {name}` follows it")
    info["state"] = state
    return info


def check_unstarted(storage: str, name: str) -> None:
    """For a sweep folder that holds only SLURM's files: one line with its job's state and how to submit
    it again. Returns for any other folder."""
    info = unstarted_job(storage, name)
    if info is None:
        return
    job_id, folder = info["jobs"][-1]["id"], Path(storage) / name
    raise SweeperError(
        f"sweep {name!r} was submitted as SLURM job {job_id}, which ended ({info['state'].lower()}) before the "
        f"sweep started (its log: {folder / SLURM_DIR / f'job-{job_id}.log'}): submit it again with "
        f"`sweeper resume {name} --storage {storage} --slurm`, or remove {folder}"
    )


# --- inside the job: Ray on the allocation's nodes -----------------------------------------------------


def job_ports(job_id: int, node_index: int) -> dict[str, int]:
    """The ports of one job's Ray: a block of :data:`PORT_BLOCK` from the job id (two jobs sharing a node
    get different blocks unless their ids are 800 apart and both run there), a per-node agent port
    within it (nodes of one job may share a host). Every other port Ray picks free at random."""
    base = PORT_BASE + (int(job_id) % PORT_BLOCKS) * PORT_BLOCK
    return {
        "gcs": base,
        "client": base + 1,
        "dashboard": base + 2,
        "agent_listen": base + 10 + node_index % (PORT_BLOCK - 10),
    }


def cpus_per_node(spec: str, n: int) -> list[int]:
    """``SLURM_JOB_CPUS_PER_NODE`` (``2(x3),1``) as one count per node of the job."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise SweeperError(f"SLURM_JOB_CPUS_PER_NODE={spec!r} is not SLURM's format (e.g. 2(x3),1)")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    if len(out) != n:
        raise SweeperError(f"SLURM_JOB_CPUS_PER_NODE={spec!r} names {len(out)} nodes; the job has {n}")
    return out


def _hostnames(nodelist: str) -> list[str]:
    out = _slurm(["scontrol", "show", "hostnames", nodelist])
    if out.returncode != 0:
        raise SweeperError(f"SLURM_JOB_NODELIST={nodelist!r}: {_slurm_error(out)}")
    return out.stdout.split()


def _node_address(host: str) -> str:
    """The address SLURM reaches ``host`` at (its NodeAddr), resolved to an IP for Ray."""
    out = _slurm(["scontrol", "show", "node", "-o", host])
    addr = host
    if out.returncode == 0:
        addr = dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv).get("NodeAddr", host)
    try:
        return socket.gethostbyname(addr)
    except OSError:
        raise SweeperError(f"node {host}: its address {addr!r} does not resolve") from None


def _answers(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=1.0):
            return True
    except OSError:
        return False


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


class RayNodes:
    """The Ray cluster of one SLURM job: a head on the first node, a worker on each other, every one
    started by its own ``srun --overlap`` step and stopped through it."""

    def __init__(self, job_id: str, hosts: list[str], cpus: list[int], gpus: int, slurm_dir: Path):
        self.job_id, self.hosts, self.cpus, self.gpus, self.dir = job_id, hosts, cpus, gpus, slurm_dir
        self.ips = [_node_address(h) for h in hosts]
        self.ports = [job_ports(int(job_id), i) for i in range(len(hosts))]
        self.address = f"{self.ips[0]}:{self.ports[0]['gcs']}"
        self.token = slurm_dir / f"ray-token-{job_id}"
        self.steps: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token),
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def _step(self, i: int, ray_args: list[str]) -> None:
        ray = str(Path(sys.executable).with_name("ray"))
        ray = ray if Path(ray).exists() else (shutil.which("ray") or "ray")
        p = self.ports[i]
        cmd = [
            "srun",
            "--nodes=1",
            "--ntasks=1",
            f"--nodelist={self.hosts[i]}",
            "--overlap",
            f"--cpus-per-task={self.cpus[i]}",
            *([f"--gpus={self.gpus}"] if self.gpus else []),
            f"--job-name=ray-{self.hosts[i]}",
            ray,
            "start",
            "--block",
            "--disable-usage-stats",
            f"--node-ip-address={self.ips[i]}",
            f"--temp-dir=/tmp/sweeper-{self.job_id}-{i}",  # short: Ray's socket paths must stay under 108 chars
            f"--num-cpus={self.cpus[i]}",
            f"--num-gpus={self.gpus}",
            f"--dashboard-agent-listen-port={p['agent_listen']}",
            *ray_args,
        ]
        log = self.dir / f"ray-{self.job_id}-{self.hosts[i]}.log"
        with open(log, "ab") as out:
            self.steps.append(
                subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True)
            )
        self.logs.append(log)

    def start(self, join: Callable[[str], None]) -> None:
        """Start the head, wait (bounded) for its port, start the workers, join as the driver
        (``join(address)``: :func:`sweeper.orchestrate.start_ray`) and wait (bounded) until every node is
        in the cluster."""
        for stale in self.dir.glob("ray-token-*"):  # a killed job's (one job of a sweep runs at a time)
            stale.unlink(missing_ok=True)
        fd = os.open(self.token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            import secrets

            f.write(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(self.token)  # the driver (this process) sends it too
        t0 = time.monotonic()
        p = self.ports[0]
        self._step(
            0,
            [
                "--head",
                f"--port={p['gcs']}",
                f"--dashboard-port={p['dashboard']}",
                "--include-dashboard=false",
            ],
        )
        while not _answers(self.ips[0], p["gcs"]):
            if self.steps[0].poll() is not None:
                raise SweeperError(
                    f"the Ray head on {self.hosts[0]} exited: {_tail(self.logs[0])} (log {self.logs[0]})"
                )
            if time.monotonic() - t0 > HEAD_WAIT:
                raise SweeperError(
                    f"waited {HEAD_WAIT:.0f} s for the Ray head on {self.hosts[0]} ({self.address}); log {self.logs[0]}"
                )
            time.sleep(0.5)
        for i in range(1, len(self.hosts)):
            self._step(i, [f"--address={self.address}"])
        join(self.address)
        import ray

        while True:
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            if alive >= len(self.hosts):
                break
            dead = [self.hosts[i] for i, s in enumerate(self.steps) if s.poll() is not None]
            if dead or time.monotonic() - t0 > NODES_WAIT:
                why = f"the Ray node on {', '.join(dead)} exited" if dead else f"waited {NODES_WAIT:.0f} s"
                raise SweeperError(
                    f"{why}: {alive} of {len(self.hosts)} nodes joined Ray at {self.address}; logs in {self.dir}"
                )
            time.sleep(0.5)
        print(
            f"sweeper: Ray on {len(self.hosts)} node{'s' if len(self.hosts) > 1 else ''} "
            f"({', '.join(self.hosts)}) at {self.address}, up in {time.monotonic() - t0:.1f} s",
            flush=True,
        )

    def stop(self) -> None:
        """Stop this job's Ray and nothing else: the driver disconnects, each node's ``srun`` is asked
        to end its step (SIGTERM, which ``ray start --block`` answers by stopping its node's processes)
        and killed if it has not within :data:`STOP_WAIT`. The token file goes too."""
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        for s in reversed(self.steps):  # workers before the head
            if s.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    s.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT
        for s in self.steps:
            try:
                s.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(s.pid, signal.SIGKILL)
                s.wait()
        self.token.unlink(missing_ok=True)


class _Signals:
    """SLURM's warning (SIGUSR2: the time limit or a preemption is near) and SIGTERM (scancel, a
    preemption) both stop the sweep as Ctrl-C does: Tune stops the trials, each keeping its last
    epoch's checkpoint. Only the warning asks for a requeue."""

    def __init__(self, job_id: str, grid: bool):
        self.job_id, self.grid = job_id, grid
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._on)
        return self

    def again(self) -> None:
        """Install the handlers again: ``ray.init`` replaces SIGTERM's with its own (``sys.exit``)."""
        for sig in self._old:
            signal.signal(sig, self._on)

    def _on(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            return
        self.received = signum
        if signum == signal.SIGUSR2 and self.grid:  # minutes ahead: each trial pauses at its next epoch's end
            print(
                f"sweeper: SLURM sent SIGUSR2 to job {self.job_id}: pausing each trial at the end of its epoch "
                f"(at most {STOP_GRACE:.0f} s), then requeueing the job",
                flush=True,
            )
            from . import stopping

            stopping.request(STOP_GRACE)
            return
        then = (
            "then requeueing the job" if signum == signal.SIGUSR2 else "not requeueing (SIGTERM: scancel or preemption)"
        )
        print(
            f"sweeper: SLURM sent {signal.Signals(signum).name} to job {self.job_id}: stopping the trials at their "
            f"last checkpoint, {then}",
            flush=True,
        )
        signal.raise_signal(signal.SIGINT)  # Tune's own stop (Ctrl-C): experiment state saved, trials stopped

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_job(
    name: str, storage: str, command: Callable[[dict[str, Any], str, bool], None], join: Callable[[str], None]
) -> None:
    """The body of a sweep's SLURM job (``sweeper slurm-job``): Ray on the job's nodes, then
    ``command(job_info, address, resume)`` (the CLI runs the submitted command, or ``resume`` when the
    sweep has started before), Ray stopped, and a requeue when SLURM warned of the job's end (SIGUSR2)
    and the sweep stopped unfinished."""
    from trainables.record import META

    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise SweeperError("sweeper slurm-job runs inside a SLURM job: submit with `sweeper run --slurm` or sbatch")
    folder = Path(storage) / name
    info = read_job(folder)
    if info is None:
        raise SweeperError(f"no SLURM job description at {folder / SLURM_DIR / JOB_JSON}")
    os.environ[SWEEP_ENV] = str(folder)
    hosts = _hostnames(os.environ.get("SLURM_JOB_NODELIST", ""))
    cpus = cpus_per_node(os.environ.get("SLURM_JOB_CPUS_PER_NODE", ",".join("1" * len(hosts))), len(hosts))
    gpus = int(info.get("slurm", {}).get("gpus_per_node") or 0)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    info.setdefault("starts", []).append(
        {"job": job_id, "restart": restarts, "nodes": hosts, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    )
    _write_job(folder, info)
    nodes = RayNodes(job_id, hosts, cpus, gpus, folder / SLURM_DIR)
    from analysis.schema import read_meta

    meta = read_meta(storage, name)
    grid = (meta.kind if meta is not None else info["command"]) != "search"  # a search's defences are not epochs
    with _Signals(job_id, grid) as signals:
        finished = False
        try:
            nodes.start(join)
            signals.again()
            command(info, nodes.address, (folder / META).exists())
            finished = True
        finally:
            nodes.stop()
            if not finished and signals.received == signal.SIGUSR2:
                out = _slurm(["scontrol", "requeue", job_id])
                if out.returncode == 0:
                    print(
                        f"sweeper: requeued job {job_id}: it resumes sweep {name} when SLURM starts it again",
                        flush=True,
                    )
                else:
                    print(f"sweeper: could not requeue job {job_id}: {_slurm_error(out)}", flush=True)


def cli_params(fn, values: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    """A CLI command's arguments as JSON (enums by value), without ``drop``: what the job calls it with."""
    from enum import Enum

    def plain(v: Any) -> Any:
        return v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else v

    return {k: plain(v) for k, v in values.items() if k not in drop}


def restore_params(fn, params: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`cli_params`: an enum's value becomes its member again, a path a Path."""
    import typing
    from enum import Enum

    hints = typing.get_type_hints(fn, include_extras=True)
    out = dict(params)
    for k, v in params.items():
        hint = hints.get(k)
        while typing.get_origin(hint) is typing.Annotated:
            hint = typing.get_args(hint)[0]
        for t in (*typing.get_args(hint), hint):
            if isinstance(t, type) and issubclass(t, Enum | Path) and v is not None:
                out[k] = t(v)
                break
    return out
