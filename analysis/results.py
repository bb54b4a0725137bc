"""Sweeps as tidy pandas frames: one row per trial, and per-epoch histories in long form.

Two sources, same columns: MLflow (the sweep's experiment on any tracking URI) and, when no
MLflow is at hand, the sweep's Ray Tune folder (``params.json`` / ``result.json`` per trial).
Config columns carry the TrialConfig types (floats, ints, bools, strings); every trial appears,
whatever its status (completed, diverged, failed, running), so nothing is silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from trainables.config import SweeperError, TrialConfig


def _all_fields() -> dict[str, str]:
    from trainables.kernel import KernelConfig
    from trainables.linear import LinearConfig

    out: dict[str, str] = {}
    for cls in (KernelConfig, LinearConfig, TrialConfig):  # network last: its types win on shared names
        out.update({f.name: str(f.type) for f in dataclasses.fields(cls)})
    return out


CONFIG_FIELDS = _all_fields()
HISTORY_METRICS = ("train_loss", "penalty", "train_acc", "clean_acc", "asr", "fisher_trace", "n_poisoned", "lr",
                   "lambda_1", "eig_gap", "overlap_sq", "max_overlap_sq")


def _typed(name: str, text: Any) -> Any:
    """An MLflow param string back to the TrialConfig field's type."""
    if not isinstance(text, str):
        return text
    if text == "None":
        return None
    ann = CONFIG_FIELDS.get(name, "str")
    try:
        if ann.startswith("bool"):
            return text == "True"
        if ann.startswith("int"):
            return int(float(text))
        if ann.startswith("float"):
            return float(text)
    except ValueError:
        return text
    return text


def sweep_meta(name: str, storage: str | Path = "./sweeps") -> dict[str, Any] | None:
    """The sweep's ``sweeper.json`` (MLflow URI, ids, grid), or None."""
    path = Path(storage).expanduser().absolute() / name / "sweeper.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_runs(uri: str, name: str) -> tuple[list, list]:
    """(trial runs, sweep parent runs) of experiment ``name``."""
    c = _mlflow_client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        raise SweeperError(f"no MLflow experiment {name!r} at {uri}")
    runs, token = [], None
    while True:
        page = c.search_runs([exp.experiment_id], max_results=5000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    trials = [r for r in runs if r.data.tags.get("sweeper.kind") == "trial"]
    parents = [r for r in runs if r.data.tags.get("sweeper.kind") == "sweep"]
    return trials, parents


def results_from_mlflow(name: str, uri: str) -> pd.DataFrame:
    """One row per trial run of sweep ``name`` at tracking ``uri``."""
    trials, _ = _experiment_runs(uri, name)
    rows = []
    for r in trials:
        row = {"sweep": name, "run_id": r.info.run_id, "trial_key": r.data.tags.get("sweeper.trial_key"),
               "trial_id": r.data.tags.get("sweeper.trial_id"), "status": r.data.tags.get("sweeper.status", "running"),
               "error": r.data.tags.get("sweeper.error", "")}
        row.update({k: _typed(k, v) for k, v in r.data.params.items() if k in CONFIG_FIELDS})
        row.update(r.data.metrics)
        rows.append(row)
    return _tidy(pd.DataFrame(rows))


def results_from_ray(name: str, storage: str | Path = "./sweeps") -> pd.DataFrame:
    """One row per trial folder of the sweep's Ray Tune experiment (no MLflow needed)."""
    folder = Path(storage).expanduser().absolute() / name
    if not folder.is_dir():
        raise SweeperError(f"no sweep folder {folder}")
    rows = []
    for tdir in sorted(p for p in folder.iterdir() if p.is_dir() and (p / "params.json").is_file()):
        cfg = json.loads((tdir / "params.json").read_text()).get("trial", {})
        results = _read_results(tdir)
        last = results[-1] if results else {}
        status = last.get("status", "pending" if not results else "running")
        if (tdir / "error.txt").is_file() or (tdir / "error.pkl").is_file():
            status = "failed" if status not in ("completed", "diverged") else status
        row = {"sweep": name, "run_id": last.get("mlflow_run_id"), "trial_key": last.get("trial_key"),
               "trial_id": last.get("trial_id", tdir.name.removeprefix("trial_")), "status": status, "error": ""}
        row.update({k: v for k, v in cfg.items() if k in CONFIG_FIELDS})
        row.update({k: v for k, v in last.items() if isinstance(v, int | float) and not isinstance(v, bool)})
        rows.append(row)
    return _tidy(pd.DataFrame(rows))


def _read_results(tdir: Path) -> list[dict[str, Any]]:
    path = tdir / "result.json"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                break
    return out


def _tidy(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    first = [c for c in ("sweep", "status", "theta", "kappa", "augment", "epochs", "seed") if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]].reset_index(drop=True)


def load_results(name: str, storage: str | Path = "./sweeps", mlflow_uri: str | None = None,
                 source: str = "auto") -> pd.DataFrame:
    """A sweep's trials as a DataFrame. ``source``: auto (MLflow if it answers, else Ray folder), mlflow, ray."""
    if source not in ("auto", "mlflow", "ray"):
        raise SweeperError(f"source={source!r} is invalid: must be auto, mlflow or ray")
    meta = sweep_meta(name, storage)
    uri = mlflow_uri or (meta or {}).get("mlflow_uri")
    if source == "ray" or (source == "auto" and uri is None):
        return results_from_ray(name, storage)
    if uri is None:
        raise SweeperError(f"no MLflow URI for sweep {name!r}: pass --mlflow-uri (no sweeper.json in {storage})")
    try:
        return results_from_mlflow(name, uri)
    except SweeperError:
        raise
    except Exception as e:
        if source == "mlflow":
            raise SweeperError(f"MLflow at {uri} failed: {str(e).splitlines()[0]}") from None
        return results_from_ray(name, storage)


def completed(df: pd.DataFrame) -> pd.DataFrame:
    """Trials with final metrics (completed); diverged, failed and unfinished ones are listed apart."""
    return df[df["status"] == "completed"] if "status" in df.columns else df


def unfinished(df: pd.DataFrame) -> pd.DataFrame:
    """Every trial that is not completed (diverged, failed, interrupted, pending)."""
    return df[df["status"] != "completed"] if "status" in df.columns else df.iloc[:0]


def default_groups(df: pd.DataFrame) -> list[str]:
    """Frontiers are per theta when the completed trials vary it (the attacker's choice), else global."""
    ok = completed(df)
    return ["theta"] if "theta" in ok.columns and ok["theta"].nunique() > 1 else []


def concat_results(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Several sweeps in one frame (the ``sweep`` column tells them apart)."""
    return pd.concat([f for f in frames if not f.empty], ignore_index=True) if frames else pd.DataFrame()


def load_history(name: str, storage: str | Path = "./sweeps", mlflow_uri: str | None = None,
                 metrics: tuple[str, ...] = HISTORY_METRICS, source: str = "auto") -> pd.DataFrame:
    """Per-epoch metrics in long form: columns sweep, run_id, trial_key, epoch, metric, value."""
    meta = sweep_meta(name, storage)
    uri = mlflow_uri or (meta or {}).get("mlflow_uri")
    rows = []
    if source != "ray" and uri is not None:
        c = _mlflow_client(uri)
        trials, _ = _experiment_runs(uri, name)
        for r in trials:
            for m in metrics:
                for point in c.get_metric_history(r.info.run_id, m):
                    rows.append({"sweep": name, "run_id": r.info.run_id, "trial_key": r.data.tags.get("sweeper.trial_key"),
                                 "epoch": point.step, "metric": m, "value": point.value})
    else:
        folder = Path(storage).expanduser().absolute() / name
        for tdir in sorted(p for p in folder.iterdir() if p.is_dir()):
            for res in _read_results(tdir):
                if res.get("status") != "running" and "epoch" not in res:
                    continue
                for m in metrics:
                    if m in res and isinstance(res[m], int | float) and not (isinstance(res[m], float) and math.isnan(res[m])):
                        rows.append({"sweep": name, "run_id": res.get("mlflow_run_id"), "trial_key": res.get("trial_key"),
                                     "epoch": res.get("epoch"), "metric": m, "value": res[m]})
        df = pd.DataFrame(rows)
        return df.drop_duplicates(["trial_key", "epoch", "metric"], keep="first") if not df.empty else df
    return pd.DataFrame(rows, columns=["sweep", "run_id", "trial_key", "epoch", "metric", "value"])


def parent_run_id(name: str, uri: str) -> str | None:
    """The sweep's parent MLflow run."""
    _, parents = _experiment_runs(uri, name)
    return parents[0].info.run_id if parents else None


def load_eigenvectors(row: pd.Series, storage: str | Path = "./sweeps", mlflow_uri: str | None = None):
    """(k, C, H, W) eigenvectors of one trial: the MLflow artifact, else the trial's last checkpoint."""
    import os
    import tempfile

    import numpy as np

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = mlflow_uri or (sweep_meta(row["sweep"], storage) or {}).get("mlflow_uri")
    if uri and isinstance(row.get("run_id"), str) and row["run_id"]:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = _mlflow_client(uri).download_artifacts(row["run_id"], "eigenvectors.npy", tmp)
                return np.load(path)
        except Exception:  # no artifact (diverged trial, hessian off) or server down: try the checkpoint
            pass
    folder = Path(storage).expanduser().absolute() / row["sweep"] / f"trial_{row.get('trial_id')}"
    ckpts = sorted(folder.glob("checkpoint_*/trial.pt"))
    if ckpts:
        import torch

        state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
        vecs = state.get("artifacts", {}).get("eigenvectors")
        if vecs is not None:
            return vecs.numpy()
    return None
