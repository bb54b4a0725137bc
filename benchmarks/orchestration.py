"""Sweep efficiency and per-trial overhead of the Ray Tune + MLflow orchestration.

Runs 8 short digits trials at concurrency 2 (one CPU each) into a temporary folder and prints:
  * efficiency = sum(trial time) / (wall x concurrency), trial time = Ray's time_total_s per
    trial, wall = Tuner.fit() (target, issue 4: >= 0.8);
  * the same with wall including Ray's start-up;
  * per-trial overhead = (wall x concurrency - sum(compute)) / trials, compute = the trial's own
    training + spectrum + detection seconds (everything else: process start, imports, data, MLflow,
    checkpoints, artifacts). Targets (issue 24): overhead <= 0.5 s, compute share >= 0.85.

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
        grid = orchestrate._tuner(meta, configs).fit()
        wall = time.perf_counter() - t1
        ray.shutdown()
    trial_time = sum(r.metrics["time_total_s"] for r in grid)
    compute = sum(
        r.metrics["train_seconds"] + r.metrics.get("hessian_seconds", 0.0) + r.metrics.get("det_seconds", 0.0)
        for r in grid
    )
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


if __name__ == "__main__":
    main()
