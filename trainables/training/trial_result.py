"""What a finished (or stopped) trial hands back: :class:`TrialResult`, and its JSON file.

Every trial kind returns one (networks from :mod:`trainables.training.train`, the closed-form kinds from
:mod:`trainables.exact_models.kernel` and :mod:`trainables.exact_models.linear`); ``write_json`` writes its JSON-able part
for ``sweeper trial --json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrialResult:
    """What a trial produced: final metrics, per-epoch history and analysis artifacts."""

    config: dict[str, Any]
    status: str  # completed | diverged
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    diverged_epoch: int | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)  # arrays/tables for tracking (not JSON)

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON-able part: config, metrics, status, history, spectrum (with the path used) and geometry table."""
        out = {
            "config": self.config,
            "metrics": self.metrics,
            "status": self.status,
            "diverged_epoch": self.diverged_epoch,
            "history": self.history,
        }
        for key in ("eigenvalues", "overlaps", "hessian", "geometry", "detection"):
            if key in self.artifacts:
                out[key] = self.artifacts[key]
        return out


def write_json(result: TrialResult, path: str | os.PathLike) -> None:
    """Write ``{"config", "metrics", "status", ...}`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result.to_json_dict(), indent=2, default=float, allow_nan=True))
    tmp.replace(path)
