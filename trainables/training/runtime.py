"""Where a trial computes: the torch device it runs on and torch's CPU thread count while it runs."""

from __future__ import annotations

import contextlib

import torch

from trainables.config import SweeperError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; an unavailable CUDA request is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SweeperError(f"device={name!r} is invalid: CUDA is not available here (use cpu or auto)")
    return torch.device(name)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with ``n`` torch CPU threads, then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
