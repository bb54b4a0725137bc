"""Start-up time of the command line: `sweeper --help` and `sweeper status NAME` against a bare Python.

Each command runs as a fresh process (the way a user types it), best of ``--repeats``; printed as
seconds and as a ratio to ``python -c pass`` measured in the same run. Target (issue 14):
`sweeper --help` and `sweeper status` under 0.5 s. `status` reads the trials' status tags from the
embedded SQLite store directly (MLflow's client costs seconds to import and open); it is measured on a
one-trial sweep made here first (untimed).

    python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

from common import print_table


def best_of(cmd: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    py = sys.executable
    cli = [py, "-m", "sweeper.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            cli
            + [
                "run",
                "--theta",
                "0.1",
                "--kappa",
                "0",
                "--epochs",
                "1",
                "--set",
                "hessian=false",
                "--set",
                "geometry=false",
                "--name",
                "s",
                "--storage",
                tmp,
                "--quiet",
            ],
            capture_output=True,
            check=True,
        )
        bare = best_of([py, "-c", "pass"], args.repeats)
        help_s = best_of(cli + ["--help"], args.repeats)
        status_s = best_of(cli + ["status", "s", "--storage", tmp], args.repeats)
        trial_help = best_of(cli + ["trial", "--help"], args.repeats)
    print(f"python -c pass: {bare:.3f} s (best of {args.repeats})")
    print_table(
        [
            ("sweeper --help / python -c pass", help_s / bare, "< 0.5 s", f"{help_s:.3f} s"),
            (
                "sweeper status NAME / python -c pass",
                status_s / bare,
                "",
                f"{status_s:.3f} s (embedded store: tags read directly)",
            ),
            ("sweeper trial --help / python -c pass", trial_help / bare, "", f"{trial_help:.3f} s"),
        ]
    )


if __name__ == "__main__":
    main()
