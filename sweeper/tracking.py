"""MLflow tracking: one experiment per sweep, a parent run per sweep, one child run per trial.

The child run of a trial is found by its ``sweeper.trial_key`` tag (a hash of the TrialConfig)
rather than created blindly, so a trial that is restarted or resumed — after a crash, a killed
driver, a Ray retry — logs into the run it already has: one run per trial, always. Epochs already
logged are not logged again. Every MLflow call is retried a few times; a logging failure that
persists is reported as a warning and never changes the trial's result.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import closing, suppress
from pathlib import Path
from typing import Any, TypeVar

from analysis.schema import check_uri, client  # noqa: F401 - check_uri: the writer checks its store with the readers' check
from trainables.record import (
    FINAL_STATUSES,
    KEY_FORMAT,
    TAG_COMMIT,
    TAG_DIVERGED_EPOCH,
    TAG_ERROR,
    TAG_KEY,
    TAG_KIND,
    TAG_NODE,
    TAG_PARENT_RUN,
    TAG_STATUS,
    TAG_SWEEP,
    TAG_TRIAL_ID,
    trial_key,
)

log = logging.getLogger("sweeper.tracking")
T = TypeVar("T")


def default_uri(storage: Path) -> str:
    """The embedded store: one SQLite database for every sweep under ``storage``."""
    return f"sqlite:///{Path(storage).absolute() / 'mlflow.db'}"


def create_store(uri: str) -> None:
    """Create the embedded SQLite store's tables now, in one process: jobs that start at the same moment on
    a new file otherwise race in MLflow's migrations (seen with two SLURM jobs: "table
    _alembic_tmp_latest_metrics already exists"). A new store starts as a copy of an empty one
    (:func:`_copy_empty_store`). Other stores are left alone."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.exists():
            _copy_empty_store(db)
        retry(lambda: client(uri).search_experiments(max_results=1), "creating the MLflow store", fatal=True)


def empty_store_template() -> Path:
    """Where this MLflow version's empty store is kept: beside the digits cache and the fallback log."""
    import importlib.metadata

    return Path("~/.cache/sweeper").expanduser() / f"mlflow-{importlib.metadata.version('mlflow')}-empty.db"


def _copy_empty_store(db: Path) -> None:
    """Put an empty store of this MLflow version at ``db``, unless something is there already.

    MLflow builds a new SQLite store by running each of its schema migrations in turn (~0.9 CPU-s, every new
    storage folder, every test sweep). The result is the same each time, so it is built once per MLflow version
    and kept (:func:`empty_store_template`) without its Default experiment: MLflow creates that when it opens
    the copy, with the artifact location it would have given it in a store it built itself. Best effort: on
    any failure MLflow builds the store as before.
    """
    import os
    import shutil
    import sqlite3

    part = db.with_name(f".{db.name}.{os.getpid()}.part")
    try:
        template = empty_store_template()
        if not template.exists():
            template.parent.mkdir(parents=True, exist_ok=True)
            tmp = template.with_name(f".{template.name}.{os.getpid()}.part")
            tmp.unlink(missing_ok=True)
            client(f"sqlite:///{tmp}").search_experiments(max_results=1)  # MLflow's own migrations, once
            with closing(sqlite3.connect(tmp)) as con, con:
                con.execute("DELETE FROM experiments WHERE experiment_id = 0")
            os.replace(tmp, template)  # another process may have put one there meanwhile: the same bytes
        shutil.copyfile(template, part)
        with suppress(FileExistsError):
            os.link(part, db)  # never over a store that appeared meanwhile
    except Exception as e:  # MLflow, SQLite or the file system: MLflow builds the store itself
        log.debug("no empty-store copy for %s: %s", db, e)
    finally:
        part.unlink(missing_ok=True)


@functools.cache
def git_commit() -> str:
    """The project's git commit, or 'unknown' outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_label(trial: dict[str, Any], axes: list[str]) -> str | None:
    """``theta=0.05 kappa=400 seed=0``: a trial's varying axes, its MLflow run name."""
    parts = [f"{a}={trial[a]:g}" if isinstance(trial.get(a), float) else f"{a}={trial.get(a)}" for a in axes]
    return " ".join(parts) or None


def _ray_node() -> str:
    """The id of the Ray node this process runs on ('' outside Ray)."""
    import sys

    ray = sys.modules.get("ray")  # not imported: not in Ray (and no import's cost)
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""


def retry(fn: Callable[[], T], what: str, attempts: int = 4, delay: float = 0.5, fatal: bool = False) -> T | None:
    """Call ``fn`` with exponential back-off; give up with a warning (or raise if ``fatal``)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # MLflow raises several types (REST, SQLAlchemy, OSError)
            if i == attempts - 1:
                if fatal:
                    raise
                log.warning("MLflow %s failed after %d attempts: %s", what, attempts, e)
                return None
            time.sleep(delay * 2**i)
    return None


def ensure_experiment(uri: str, name: str, artifact_root: Path | None) -> str:
    """The experiment id of sweep ``name``, created (with local artifacts under ``artifact_root``) if new."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (Path(artifact_root) / name).absolute().as_uri() if artifact_root is not None else None
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another driver
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_parent(uri: str, experiment_id: str, sweep: str, params: dict[str, Any]) -> str:
    """The sweep's parent run (created once; its id is kept in the sweep folder for resume)."""
    from mlflow.entities import Param, RunTag

    c = client(uri)
    run = c.create_run(
        experiment_id,
        run_name=sweep,
        tags={TAG_SWEEP: sweep, TAG_KIND: "sweep", TAG_COMMIT: git_commit(), TAG_STATUS: "running"},
    )
    c.log_batch(
        run.info.run_id,
        params=[Param(k, str(v)[:6000]) for k, v in params.items()],
        tags=[RunTag("mlflow.note.content", f"sweeper sweep {sweep}")],
    )
    return run.info.run_id


def finish_parent(uri: str, run_id: str, status: str, summary: dict[str, float]) -> None:
    """Close the parent run with the sweep's counts."""
    c = client(uri)

    def _do():
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        c.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()])
        c.set_tag(run_id, TAG_STATUS, status)
        c.set_terminated(run_id, "FINISHED" if status == "completed" else "FAILED")

    retry(_do, "closing the sweep's parent run")


class TrialTracker:
    """Logs one trial into its (unique) child run."""

    def __init__(
        self,
        uri: str,
        experiment_id: str,
        parent_run_id: str,
        sweep: str,
        config: dict[str, Any],
        trial_id: str,
        label: str | None = None,
        kind: str = "trial",
        tags: dict[str, str] | None = None,
        key_format: int = KEY_FORMAT,
        node: str | None = None,
    ):
        self.uri, self.experiment_id, self.parent = uri, experiment_id, parent_run_id
        self.kind, self.tags = kind, dict(tags or {})  # 'trial' (a model) or 'defence' (a search's defence)
        self.sweep, self.config, self.trial_id = sweep, config, trial_id
        self.key = trial_key(config, key_format)  # the sweep's format (sweeper.json's key_format)
        self.label = label  # the run's name: its varying axes (theta=0.05 kappa=400 seed=0)
        self.client = client(uri)
        self.run_id: str | None = None
        self.logged_step = 0  # highest epoch already in the run
        self.finished = False
        self.final_metrics: dict[str, float] = {}  # of a run that already finished (a trial never re-runs)
        self.final_status: str | None = None
        self.node = _ray_node() if node is None else node  # the driver logs for trials on other nodes: '' until known
        retry(self._open, "opening the trial's run")

    def _open(self) -> None:
        from mlflow.entities import Param

        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_KEY}` = '{self.key}' and tags.`{TAG_SWEEP}` = '{self.sweep}'",
            max_results=5,
        )
        mine = [r for r in found if r.data.tags.get(TAG_PARENT_RUN) == self.parent]
        if mine:
            run = sorted(mine, key=lambda r: r.info.start_time)[0]
            self.run_id = run.info.run_id
            self.finished = run.data.tags.get(TAG_STATUS) in FINAL_STATUSES
            if self.finished:
                self.final_metrics = dict(run.data.metrics)
                self.final_status = run.data.tags.get(TAG_STATUS)
            else:  # a retry or a resume: the run is live again
                self.client.set_tag(self.run_id, TAG_STATUS, "running")
            hist = self.client.get_metric_history(self.run_id, "train_loss")
            self.logged_step = max((m.step for m in hist), default=0)
            self.client.set_tag(self.run_id, TAG_TRIAL_ID, self.trial_id)
            self.client.set_tag(self.run_id, TAG_NODE, self.node)
            return
        name = self.label or f"{self.sweep}-{self.key[:8]}"
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={
                TAG_PARENT_RUN: self.parent,
                TAG_SWEEP: self.sweep,
                TAG_KEY: self.key,
                TAG_TRIAL_ID: self.trial_id,
                TAG_STATUS: "running",
                TAG_KIND: self.kind,
                TAG_COMMIT: git_commit(),
                TAG_NODE: self.node,
                **self.tags,
            },
        )
        self.run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in sorted(self.config.items())]
        for s in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[s : s + 100])

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        """Per-epoch metrics with step = epoch; epochs already in the run are skipped."""
        step = int(metrics["epoch"])
        if self.run_id is None or step <= self.logged_step:
            return
        self._log_metrics(metrics, step)
        self.logged_step = step

    def _log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "epoch"
        ]
        retry(lambda: self.client.log_batch(self.run_id, metrics=batch), f"logging epoch {step}")

    def set_node(self, node: str) -> None:
        """Record the Ray node the trial runs on (it changes when a retry lands elsewhere)."""
        if self.run_id is None or not node or node == self.node:
            return
        self.node = node
        retry(lambda: self.client.set_tag(self.run_id, TAG_NODE, node), "tagging the trial's node")

    def log_final(self, result) -> None:
        """Final metrics (step = last epoch), artifacts, status tag, and the run's end."""
        if self.run_id is None or self.finished:
            return
        with tempfile.TemporaryDirectory() as tmp:
            files = write_artifacts(result, Path(tmp))
            self.close(result.metrics, result.history, result.status, result.diverged_epoch, files)

    def close(
        self,
        metrics: dict[str, Any],
        history: list[dict[str, Any]],
        status: str,
        diverged_epoch: int | None,
        files: list[Path],
    ) -> None:
        """End the run: epochs of ``history`` it lacks, the final metrics not already an epoch's (step = last
        epoch), the artifact ``files``, the status tag. The driver calls this with what a trial's final
        checkpoint holds, a worker (:meth:`log_final`) with the result in hand."""
        if self.run_id is None or self.finished:
            return
        for past in history:  # epochs whose logging a killed driver or a dead server missed
            self.log_epoch(past)
        step = int(metrics.get("epoch", 0))
        last = history[-1] if history else {}
        self._log_metrics({k: v for k, v in metrics.items() if k not in last}, step)  # analysis metrics
        for path in files:
            retry(lambda p=path: self.client.log_artifact(self.run_id, str(p)), f"uploading {path.name}")

        def _close():
            self.client.set_tag(self.run_id, TAG_STATUS, status)
            if diverged_epoch is not None:
                self.client.set_tag(self.run_id, TAG_DIVERGED_EPOCH, str(diverged_epoch))
            self.client.set_terminated(self.run_id, "FINISHED")

        retry(_close, "closing the trial's run")
        self.finished = True

    def log_failure(self, error: BaseException | str) -> None:
        """Mark the run failed (the trial raised); a later retry reopens the same run."""
        if self.run_id is None:
            return
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"

        def _do():
            self.client.set_tag(self.run_id, TAG_STATUS, "failed")
            self.client.set_tag(self.run_id, TAG_ERROR, text[:5000])
            self.client.set_terminated(self.run_id, "FAILED")

        retry(_do, "marking the trial failed")


def sweep_tracker(
    sweep: dict[str, Any], config: dict[str, Any], trial_id: str, point: dict[str, Any], **kw: Any
) -> TrialTracker:
    """The tracker of a grid trial: ``sweep`` the trials' tracking settings (orchestrate's ``_sweep_settings``),
    ``config`` its full config, ``point`` the trial's own values (its run's name)."""
    return TrialTracker(
        sweep["mlflow_uri"],
        sweep["experiment_id"],
        sweep["parent_run_id"],
        sweep["name"],
        config,
        trial_id,
        run_label(point, sweep.get("axes", [])),
        key_format=sweep.get("key_format", 1),
        **kw,
    )


def train_tracked(trial, tracker: TrialTracker, after_epoch: Callable[[dict[str, Any]], None]):
    """Train ``trial`` (a :class:`trainables.training.train.Trial`) to the end under ``tracker``: epochs run
    before a restart are logged if MLflow lacks them, each new epoch is logged and handed to
    ``after_epoch`` (which checkpoints), then the analysis runs and the final result is logged and
    returned. A trial that raises marks its run failed, and the error propagates."""
    try:
        for past in trial.history:  # epochs run before a restart: make sure MLflow has them
            tracker.log_epoch(past)
        while not trial.done:
            metrics = trial.train_epoch()
            tracker.log_epoch(metrics)
            after_epoch(metrics)
        trial.analyze()
        result = trial.result()
        tracker.log_final(result)
    except Exception as e:
        tracker.log_failure(e)
        raise
    return result


def write_artifacts(result, folder: Path) -> list[Path]:
    """Spectrum JSON, geometry table, eigenvector and trigger images of a trial, as files."""
    files = []
    art = result.artifacts
    if "eigenvalues" in art:
        p = folder / "spectrum.json"
        p.write_text(
            json.dumps(
                {
                    "eigenvalues": art["eigenvalues"],
                    "overlaps": art.get("overlaps"),
                    "max_overlap_index": result.metrics.get("max_overlap_index"),
                    **art.get("hessian", {}),
                },
                indent=2,
            )
        )
        files.append(p)
    if "geometry" in art:
        import pandas as pd

        p = folder / "geometry.csv"
        pd.DataFrame(art["geometry"]).to_csv(p, index=False)
        files.append(p)
    if "eigenvectors" in art:
        files.append(
            eigenvector_image(
                art["eigenvectors"], art.get("eigenvalues"), art.get("overlaps"), folder / "eigenvectors.png"
            )
        )
        import numpy as np

        p = folder / "eigenvectors.npy"
        np.save(p, art["eigenvectors"].numpy())
        files.append(p)
    if "trigger_direction" in art:
        files.append(
            eigenvector_image(
                art["trigger_direction"][None], None, None, folder / "trigger.png", titles=["trigger direction"]
            )
        )
    if "weight_images" in art:  # linear trials: the weight differences of Fig. 4
        import torch

        imgs = art["weight_images"]
        stack = torch.stack([torch.as_tensor(v, dtype=torch.float32)[None] for v in imgs.values()])
        files.append(eigenvector_image(stack, None, None, folder / "weights.png", titles=list(imgs)))
    if "detection" in art:
        p = folder / "detection.json"
        p.write_text(json.dumps(art["detection"], indent=2, default=float))
        files.append(p)
    files += _detection_images(art.get("detection_images", {}), art.get("detection", {}), folder)
    if "filter" in art:  # a filtering defence: the removed training indices, the suspect class, the scorer's details
        p = folder / "filter.json"
        p.write_text(json.dumps(art["filter"], default=float))
        files.append(p)
    if result.history:
        p = folder / "history.json"
        p.write_text(json.dumps(result.history, default=float))
        files.append(p)
    return files


def _detection_images(images: dict, detection: dict, folder: Path) -> list[Path]:
    """Localisation maps of the top eigenvectors and Neural Cleanse's reversed triggers (<= 20 classes shown)."""
    files = []
    details = detection.get("details", {})
    if "localisation" in images:
        ipr = details.get("localisation", {}).get("ipr", [])
        maps = images["localisation"]
        titles = [f"v{j + 1} energy" + (f"\nIPR={ipr[j]:.2f}" if j < len(ipr) else "") for j in range(len(maps))]
        files.append(eigenvector_image(maps, None, None, folder / "localisation.png", titles=titles))
    for key, name in (("nc_triggers", "nc_triggers.png"), ("nc_masks", "nc_masks.png")):
        if key in images:
            stack = images[key][:20]
            idx = details.get("nc", {}).get("anomaly_index", [])
            titles = [f"class {c}" + (f"\nindex={idx[c]:.2f}" if c < len(idx) else "") for c in range(len(stack))]
            files.append(eigenvector_image(stack, None, None, folder / name, titles=titles))
    return files


def eigenvector_image(vectors, eigenvalues, overlaps, path: Path, titles: list[str] | None = None) -> Path:
    """A row of (C, H, W) vectors as images (channel-mean for colour), like the paper's Figs 8 and 12:
    titled by ``titles``, else by eigenvalue (and the overlap with the trigger). Drawn with Pillow
    (:mod:`sweeper.tile_images`): no matplotlib in the trial's process."""
    from .tile_images import tiles_png

    k = vectors.shape[0]
    if titles is None and eigenvalues is not None:
        titles = [
            f"v{j + 1}  λ={eigenvalues[j]:.3g}" + (f"\ncos²={overlaps[j] ** 2:.2f}" if overlaps is not None else "")
            for j in range(k)
        ]
    return tiles_png(vectors, titles or [], path)
