"""Sweep efficiency and per-trial overhead of the Ray Tune + MLflow orchestration.

Runs 8 short digits trials at concurrency 2 (one CPU each) into a temporary folder and prints:
  * efficiency = sum(trial time) / (wall x concurrency), trial time = Ray's time_total_s per
    trial, wall = Tuner.fit() (target, issue 4: >= 0.8);
  * the same with wall including Ray's start-up;
  * per-trial overhead = (wall x concurrency - sum(compute)) / trials, compute = the trial's own
    training + spectrum + detection seconds (everything else: process start, imports, data, MLflow,
    checkpoints, artifacts). Targets (issue 24): overhead <= 0.5 s, compute share >= 0.85;
  * Ray Tune's own floor, in the same run: the same number of trials, concurrency, reused actors and
    per-epoch reports, each with a checkpoint the size of a real epoch's, from a trainable that imports
    torch (every trial must) and spins for the real trials' mean compute per epoch (CPU time, so Ray's
    own processes compete for the cores as they do with real trials). Its overhead is what no change
    inside sweeper's trainable can remove.

    python benchmarks/orchestration.py [--epochs 5] [--trials 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray
from common import print_table

from analysis.schema import write_meta
from sweeper import orchestrate, tracking
from sweeper.orchestrate import SweepOptions
from sweeper.spaces import SweepSpec


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=2)
    args = ap.parse_args()
    kappas = [float(10 * i) for i in range(args.trials)]
    spec = SweepSpec(axes={"kappa": kappas}, fixed={"epochs": args.epochs, "theta": 0.1})
    with tempfile.TemporaryDirectory() as tmp:
        opts = SweepOptions(name="bench", storage=tmp, max_concurrent=args.concurrency, verbose=0)
        configs, meta = orchestrate.prepare(spec, opts)
        t0 = time.perf_counter()
        orchestrate.start_ray(None)
        t_ray = time.perf_counter() - t0
        meta.gpus_per_trial = 0.0
        meta.experiment_id = tracking.ensure_experiment(meta.mlflow_uri, "bench", None)
        meta.parent_run_id = tracking.start_parent(meta.mlflow_uri, meta.experiment_id, "bench", {})
        write_meta(meta.storage, "bench", meta)
        t1 = time.perf_counter()
        grid = orchestrate.fit(meta, orchestrate._tuner(meta, configs))
        wall = time.perf_counter() - t1
        compute = sum(
            r.metrics["train_seconds"] + r.metrics.get("hessian_seconds", 0.0) + r.metrics.get("det_seconds", 0.0)
            for r in grid
        )
        floor = _tune_floor(tmp, configs, epochs=args.epochs, concurrency=args.concurrency, compute=compute)
        ray.shutdown()
    trial_time = sum(r.metrics["time_total_s"] for r in grid)
    c, n = args.concurrency, len(configs)
    rows = [
        (
            "sweep efficiency  sum(trial time) / (fit wall x concurrency)",
            trial_time / (wall * c),
            ">= 0.8",
            f"{trial_time:.1f} s / ({wall:.1f} s x {c})",
        ),
        ("  ... with Ray start-up in the wall", trial_time / ((wall + t_ray) * c), "", f"ray.init {t_ray:.1f} s"),
        (
            "compute share  sum(train + spectrum + detection) / (fit wall x concurrency)",
            compute / (wall * c),
            ">= 0.85",
            f"{compute:.1f} s",
        ),
    ]
    print(f"{n} trials x {args.epochs} epochs (digits, cnn), concurrency {c}, 1 CPU per trial")
    print_table(rows)
    print(f"per-trial overhead (wall x concurrency - compute) / trials: {(wall * c - compute) / n:.2f} s")
    print(f"per-trial overhead inside the trial (time_total_s - compute): {(trial_time - compute) / n:.2f} s")
    f_wall, f_compute = floor
    print(
        f"Ray Tune's floor (a spinning trainable of the same shape): per-trial overhead "
        f"{(f_wall * c - f_compute) / n:.2f} s, compute share {f_compute / (f_wall * c):.2f}"
    )


def _tune_floor(tmp: str, configs, epochs: int, concurrency: int, compute: float) -> tuple[float, float]:
    """(fit wall, total compute) of one trial per config that only spins for the real trials' mean compute
    per epoch and reports with a checkpoint of a real epoch's size: Ray Tune's own cost of running them.
    The compute is the spinning's measured wall time, as the real trials' is their training's."""
    import io
    import os
    import tempfile
    from pathlib import Path

    import torch
    from ray import tune

    from trainables.training.train import Trial

    n = len(configs)
    per_epoch = compute / (n * epochs)
    trial = Trial(configs[0])
    trial.train_epoch()
    buf = io.BytesIO()
    torch.save(trial.state_dict(), buf)  # a mid-training checkpoint (the final one adds the analysis)
    ckpt_bytes = buf.tell()

    def spinner(config):
        import torch  # noqa: F401 - every trial imports torch: part of the floor

        spent = 0.0
        for e in range(epochs):
            t0, end = time.perf_counter(), time.thread_time() + per_epoch
            while time.thread_time() < end:  # CPU-bound, like training
                pass
            spent += time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as d:
                Path(d, "trial.pt").write_bytes(os.urandom(ckpt_bytes))
                tune.report({"epoch": e + 1, "compute": spent}, checkpoint=tune.Checkpoint.from_directory(d))

    tuner = tune.Tuner(
        tune.with_resources(spinner, {"cpu": 1}),
        param_space={"i": tune.grid_search(list(range(n)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(
            storage_path=tmp, name="floor", verbose=0, checkpoint_config=tune.CheckpointConfig(num_to_keep=1)
        ),
    )
    t0 = time.perf_counter()
    results = tuner.fit()
    return time.perf_counter() - t0, sum(r.metrics["compute"] for r in results)


if __name__ == "__main__":
    main()
