"""Timing and the ratio table shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings are honest (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device = torch.device("cpu"), repeats: int = 1) -> float:
    """Best wall-clock seconds of ``repeats`` calls."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def print_table(rows: Sequence[tuple[str, float, str, str]]) -> None:
    """Rows of (measure, ratio, target, detail), aligned."""
    w = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(w)}  {'ratio':>7}  {'target':>7}  detail")
    for name, ratio, target, detail in rows:
        print(f"{name.ljust(w)}  {ratio:7.2f}  {target:>7}  {detail}")


def device_parser(doc: str):
    """An argparse parser with ``--device`` (cuda when available), described by the script's docstring."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap


def header(device: torch.device) -> None:
    """The line every benchmark starts with: where it ran."""
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
