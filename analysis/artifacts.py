"""A sweep's trial artifacts (eigenvectors, reversed triggers, figures), read with as few round trips as it can.

:class:`Artifacts` looks a file up in the embedded store's folder, then (eigenvectors) in the
trial's last Ray checkpoint, and only then asks MLflow, once its tracking URI answered a quick
check; :func:`load_eigenvectors` is the one-trial shortcut. The report and the detection figures
read artifacts through it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from trainables.config import SweeperError

from . import schema
from .results import sweep_meta


class Artifacts:
    """A sweep's trial artifacts, read with as few round trips as it can.

    A file is looked up first where the embedded store keeps it (``<storage>/mlartifacts/<sweep>/<run
    id>/artifacts/``, no MLflow needed), eigenvectors then in the trial's last Ray checkpoint, and only
    then downloaded through MLflow's client, once the tracking URI answered a quick check: MLflow's own
    HTTP retries against a dead server take minutes. ``use_mlflow`` False never asks MLflow (a caller
    that already found it unavailable); after one failed download no other is tried. ``missing`` counts
    the trials whose eigenvectors were found nowhere, ``skipped`` the lookups that only MLflow could have
    answered but that it was not asked, and ``why`` says why, for the caller's note.
    """

    def __init__(
        self,
        name: str,
        storage: str | Path = "./sweeps",
        mlflow_uri: str | None = None,
        use_mlflow: bool = True,
        meta: schema.SweepMeta | None = None,
    ):
        self.name, self.storage = name, storage
        meta = meta if meta is not None else sweep_meta(name, storage)
        self.uri = mlflow_uri or (meta.mlflow_uri if meta else None)
        self.folder = schema.local_folder(storage, name)
        self.store = self.folder.parent / "mlartifacts" / name if self.folder is not None else None
        self.why: str | None = None if use_mlflow else "MLflow unavailable"
        self.missing = self.skipped = 0
        self._client = None

    def local(self, run_id: Any, artifact: str) -> Path | None:
        """The artifact's file in the embedded store on this machine, or None."""
        if self.store is None or not isinstance(run_id, str) or not run_id:
            return None
        path = self.store / run_id / "artifacts" / artifact
        return path if path.is_file() else None

    def _mlflow(self):
        """MLflow's client, or None once MLflow is known not to answer (checked once, in seconds)."""
        if self.why is not None:
            return None
        if self.uri is None:
            self.why = "no MLflow URI"
            return None
        if self._client is None:
            try:
                schema.check_uri(self.uri)
            except SweeperError as e:
                self.why = str(e)
                return None
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            self._client = schema.client(self.uri)
        return self._client

    def fetch(self, run_id: Any, artifact: str, into: Path) -> Path | None:
        """The artifact as a local file: the embedded store's own, else downloaded into ``into``; None when
        the run has no such artifact or MLflow cannot be asked."""
        path = self.local(run_id, artifact)
        if path is not None or not isinstance(run_id, str) or not run_id:
            return path
        if self.store is not None and (self.store / run_id / "artifacts").is_dir():
            return None  # the run's artifacts are all here: it has no such artifact, and MLflow has none either
        c = self._mlflow()
        if c is None:
            self.skipped += self.why is not None
            return None
        try:
            return Path(c.download_artifacts(run_id, artifact, str(into)))
        except Exception as e:  # no such artifact (hessian off, baseline not run), or the server went away
            if _unreachable(e):
                self.why = f"MLflow at {self.uri} stopped answering ({str(e).splitlines()[0][:200]})"
                self.skipped += 1
            return None

    def eigenvectors(self, row: pd.Series):
        """(k, C, H, W) eigenvectors of one trial: the stored artifact, the trial's last checkpoint, else
        MLflow; None (counted in ``missing``) when none has them."""
        import tempfile

        import numpy as np

        path = self.local(row.get("run_id"), "eigenvectors.npy")
        if path is not None:
            return np.load(path)
        vecs = self._checkpoint_eigenvectors(row)
        if vecs is not None:
            return vecs
        with tempfile.TemporaryDirectory() as tmp:
            path = self.fetch(row.get("run_id"), "eigenvectors.npy", Path(tmp))
            if path is not None:
                return np.load(path)
        self.missing += 1
        return None

    def _checkpoint_eigenvectors(self, row: pd.Series):
        if self.folder is None or not isinstance(row.get("trial_id"), str):
            return None
        ckpts = sorted((self.folder / f"trial_{row['trial_id']}").glob("checkpoint_*/trial.pt"))
        if not ckpts:
            return None
        import torch

        try:
            state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
        except Exception:  # a checkpoint cut by a kill: the artifact may still come from MLflow
            return None
        vecs = state.get("artifacts", {}).get("eigenvectors")
        return vecs.numpy() if vecs is not None else None


def _unreachable(e: Exception) -> bool:
    """Whether an MLflow client error means the server cannot be reached (not a missing artifact)."""
    import requests

    text = str(e)
    return isinstance(e, requests.exceptions.ConnectionError | requests.exceptions.Timeout) or any(
        s in text for s in ("Max retries exceeded", "Connection refused", "timed out")
    )


def load_eigenvectors(row: pd.Series, storage: str | Path = "./sweeps", mlflow_uri: str | None = None):
    """(k, C, H, W) eigenvectors of one trial: the stored artifact, else the trial's last checkpoint, else
    MLflow (asked only when it answers within seconds); None when none has them. Many trials: use one
    :class:`Artifacts` (one check of MLflow, one client)."""
    return Artifacts(row["sweep"], storage, mlflow_uri).eigenvectors(row)
