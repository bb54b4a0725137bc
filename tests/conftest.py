"""Shared fixtures: tiny datasets written in the real file formats."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from trainables.data.images import CIFAR10_FILES, MNIST_FILES, write_cifar_batch, write_idx

# One torch thread per test process under xdist (three processes on the two cores): two threads in each of two
# processes oversubscribed the cores, and OpenMP's spin-waits then made tests of many tiny ops up to 10x slower
# (MM-BD's and Neural Cleanse's Adam loops: 3.5 s alone, 37 s beside a sweep). Trials set their own count (config
# field threads).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _registrations_end_with_the_test():
    """Every registry (and the plugins imported in this process) as before the test: one test's toy
    trigger, or a plugin's declared field, never leaks into the next test."""
    import sys

    from trainables import TRIAL_KINDS, plugins
    from trainables.attack.triggers import TRIGGERS
    from trainables.data.datasets import DATASETS
    from trainables.defence.penalty import PENALTIES
    from trainables.detection.baselines import BASELINES
    from trainables.detection.statistics import DETECTORS
    from trainables.fields import EXTRA_FIELDS
    from trainables.networks.models import MODELS

    registries = (TRIAL_KINDS, TRIGGERS, DATASETS, PENALTIES, BASELINES, DETECTORS, EXTRA_FIELDS, MODELS)
    saved = [dict(r) for r in registries]
    loaded, env_done, eps_done = list(plugins._loaded), plugins._env_done, plugins._entry_points_done
    yield
    for registry, before in zip(registries, saved, strict=True):
        registry.clear()
        registry.update(before)
    for name in set(plugins._loaded) - set(loaded):  # imported again (and so registered again) when next asked
        sys.modules.pop(name, None)
    plugins._loaded[:] = loaded
    plugins._env_done, plugins._entry_points_done = env_done, eps_done


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "call" and outcome.get_result().failed:
        item.ray_suspect = True  # its Ray may hold stuck trials: not kept for the next test


@pytest.fixture(autouse=True)
def _ray_between_tests(request):
    """The local Ray that sweeper started is kept for the next test in this process (a Ray start costs about
    3 CPU-seconds; ``start_ray`` reuses it only when started for the same address and worker environment).
    Shut down after a failed test, when a trial still holds a CPU, and when the test's Ray is not that one
    (a cluster it joined, its own ``ray.init``)."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    from sweeper.orchestrate import ray_started_here

    started = ray_started_here()
    idle = (
        started is not None
        and started.target == "local"
        and ray.available_resources().get("CPU") == ray.cluster_resources().get("CPU")
    )
    if not idle or getattr(request.node, "ray_suspect", False):
        ray.shutdown()


@pytest.fixture
def no_ray():
    """No Ray in this process when the test starts (it checks that a command started none, or starts its own)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def driver_text(text: str) -> str:
    """What the driver printed, without Ray's known shutdown noise from its worker processes.

    A Ray worker that receives SIGTERM while a weakref callback runs prints "Exception ignored in
    ... sigterm_handler ... SystemExit: 1" (Ray's handler raising inside the GC): seen once in CI,
    harmless, not ours. Only that traceback is dropped; any other worker traceback stays.
    """
    lines, out, i = text.splitlines(keepends=True), [], 0
    while i < len(lines):
        j = i
        if WORKER.match(lines[i]) and "Exception ignored in" in lines[i]:
            while j + 1 < len(lines) and WORKER.match(lines[j + 1]) and "SystemExit" not in lines[j]:
                j += 1
            block = "".join(lines[i : j + 1])
            if "sigterm_handler" in block and "SystemExit" in block:
                i = j + 1
                continue
        out.append(lines[i])
        i += 1
    return "".join(out)


WORKER = re.compile(r"^\S*\(\w+ pid=\d+(, ip=[\d.]+)?\)")


def make_mnist_files(folder, n_train=200, n_test=60, seed=0):
    """Write the four MNIST IDX gz files with class-dependent blobs so a model can learn them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):  # a bright bar whose row encodes the class
            x[i, 2 + 2 * c : 4 + 2 * c, 4:20] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
    assert sorted(p.name for p in folder.iterdir()) == sorted(MNIST_FILES)
    return folder


def make_cifar10_files(folder, n_per_batch=20, seed=0):
    """Write data_batch_1..5 and test_batch as CIFAR-10 python pickles."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in CIFAR10_FILES:
        x = rng.integers(0, 256, (n_per_batch, 3, 32, 32)).astype(np.uint8)
        y = rng.integers(0, 10, n_per_batch)
        write_cifar_batch(folder / name, x, y)
    return folder


# The test suite keeps both cores busy, so a sweep's second trial worker buys no time and costs ~4 CPU-seconds
# of imports (torch, MLflow, Tune): sweeps whose point is not concurrency run one worker, reused trial after trial.
ONE_WORKER = ["--max-concurrent", "1"]

# tiny but complete trials: training, spectrum and geometry all run
FAST = {"epochs": 1, "hessian_samples": 100, "hessian_iterations": 6, "hessian_top_k": 3}


@pytest.fixture(scope="session")
def grid_sweep(tmp_path_factory):
    """A real 2 x 3 sweep on local Ray + embedded MLflow, shared by the sweep and analysis tests.

    kappa = 1e8 diverges on purpose, so reports must list it. Built once per test run: the first test process
    to need it builds it under a lock, the others (pytest-xdist) wait and read the same folder and report.
    """
    import fcntl
    import pickle

    from sweeper.orchestrate import SweepOptions, run_sweep
    from sweeper.spaces import SweepSpec

    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:  # the run's own folder, above each worker's
        root = root.parent
    saved = root / "grid-sweep.pickle"
    with open(root / "grid-sweep.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the build fails
        if saved.exists():
            return pickle.loads(saved.read_bytes())
        # a folder of the builder's own: a process that builds after another's build failed starts afresh
        storage = root / f"grid-sweep-{os.getpid()}"
        storage.mkdir()
        spec = SweepSpec(axes={"theta": [0.0, 0.1], "kappa": [0.0, 50.0, 1e8]}, fixed=FAST)
        # one trial worker: the SLURM tests (the largest xdist group, handed out first) keep the other test process
        # busy meanwhile, so a second worker's ~4 CPU-s of imports would buy nothing
        report = run_sweep(spec, SweepOptions(name="grid", storage=str(storage), verbose=0, max_concurrent=1))
        saved.write_bytes(pickle.dumps((storage, report)))
    return storage, report


@pytest.fixture
def mnist_dir(tmp_path):
    make_mnist_files(tmp_path / "mnist")
    return tmp_path


@pytest.fixture
def cifar_dir(tmp_path):
    make_cifar10_files(tmp_path / "cifar-10-batches-py")
    return tmp_path
