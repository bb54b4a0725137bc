"""Frontier and hypervolume speed on synthetic sweeps.

Prints seconds for the non-dominated set of 100 000 synthetic trials (2 objectives: target < 1 s,
issue 5; and 3 objectives), the 2-objective hypervolume, and, as a ratio measured in the same run,
the O(n log n) 2-D frontier against the all-pairs check on 5 000 points.

    python benchmarks/pareto.py [--n 100000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from analysis.pareto import _dominated_by, frontier, hypervolume, pareto_mask


def timed(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    # clean accuracy and ASR on a 1e-3 grid (ties and duplicates, as real sweeps have), plus overlap^2
    df = pd.DataFrame(
        {
            "clean_acc": rng.integers(0, 1000, args.n) / 1000,
            "asr": rng.integers(0, 1000, args.n) / 1000,
            "max_overlap_sq": rng.random(args.n),
            "theta": rng.choice([0.01, 0.02, 0.05], args.n),
        }
    )
    t2, f2 = timed(lambda: frontier(df))
    t3, f3 = timed(lambda: frontier(df, [("clean_acc", "max"), ("asr", "min"), ("max_overlap_sq", "min")]))
    tg, _ = timed(lambda: frontier(df, group_by=["theta"]))
    th, hv = timed(lambda: hypervolume(df[["clean_acc", "asr"]].to_numpy(), ["max", "min"], [0.0, 1.0]))
    small = df[["clean_acc", "asr"]].to_numpy()[:5000] * np.array([-1.0, 1.0])
    t_fast, _ = timed(lambda: pareto_mask(small * np.array([-1.0, 1.0]), ["max", "min"]))
    t_pairs, _ = timed(lambda: ~_dominated_by(small, small), 1)
    print(f"{args.n:,} synthetic trials")
    print(f"{'measure':58}  {'seconds':>8}  target")
    print(f"{'frontier, 2 objectives (clean_acc max, asr min)':58}  {t2:8.3f}  < 1 s   ({len(f2)} points)")
    print(f"{'frontier, 2 objectives, per theta (3 groups)':58}  {tg:8.3f}")
    print(f"{'frontier, 3 objectives (+ max_overlap_sq min)':58}  {t3:8.3f}          ({len(f3)} points)")
    print(f"{'hypervolume, 2 objectives':58}  {th:8.3f}          (HV = {hv:.4f})")
    print(f"all-pairs / sorted 2-D frontier on 5,000 points: {t_pairs / t_fast:.0f}x")


if __name__ == "__main__":
    main()
