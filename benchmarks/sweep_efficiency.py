"""How well a finished sweep used its slots: wall time per model and where it went.

Reads the sweep's MLflow runs (no re-run): per model, its run's wall time (start to end) and the
trial's own training, spectrum and detection seconds; for the sweep, the span from the first model's
start to the last one's end, the slot occupancy sum(model wall) / (slots x span) and the compute
share (train + spectrum + detection) / model wall (the rest: data loading, evaluation, MLflow
logging and artifacts, actor start-up).

    python benchmarks/sweep_efficiency.py detect-digits --storage sweeps --slots 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from analysis.schema import client, read_meta
    from trainables.record import TAG_KIND

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("--storage", default="./sweeps")
    p.add_argument("--slots", type=float, default=None, help="concurrent models [default: the sweep's max_concurrent]")
    a = p.parse_args()
    meta = read_meta(a.storage, a.name)
    if meta is None:
        sys.exit(f"no sweep {a.name!r} in {a.storage}")
    slots = a.slots or (meta.max_concurrent if meta.kind != "search" else None)  # a search's counts defences
    if not slots:
        sys.exit("pass --slots: the sweep did not record its concurrency")
    runs = client(meta.mlflow_uri).search_runs([meta.experiment_id], max_results=50_000)
    models = [r for r in runs if r.data.tags.get(TAG_KIND) == "trial" and r.info.end_time]
    if not models:
        sys.exit(f"sweep {a.name!r} has no finished models")
    wall = np.array([(r.info.end_time - r.info.start_time) / 1000 for r in models])
    parts = {
        k: np.array([r.data.metrics.get(k, np.nan) for r in models])
        for k in ("train_seconds", "hessian_seconds", "det_seconds")
    }
    span = (max(r.info.end_time for r in models) - min(r.info.start_time for r in models)) / 1000
    compute = sum(np.nansum(v) for v in parts.values())
    print(f"sweep {a.name}: {len(models)} models on {slots:g} slots in {span:.0f} s")
    print(f"wall per model: mean {wall.mean():.2f} s, median {np.median(wall):.2f} s, max {wall.max():.2f} s")
    print("of which: " + ", ".join(f"{k.removesuffix('_seconds')} {np.nanmean(v):.2f} s" for k, v in parts.items()))
    print(f"slot occupancy sum(model wall) / (slots x span): {wall.sum() / (slots * span):.3f}")
    print(f"compute share (train + spectrum + detection) / model wall: {compute / wall.sum():.3f}")


if __name__ == "__main__":
    main()
