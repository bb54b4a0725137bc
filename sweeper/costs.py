"""What a planned trial will cost, measured where the store has done it before.

``sweeper plan`` estimates each trial's CPU seconds in three parts: training, the input-Hessian
spectrum and detection. The rough model (:func:`estimate_seconds`, from the model registry's step cost
and the dataset's size) misjudges some cases
(28x28 data at half the measured time; a detection population at 8 min against 617 s). When the tracking
store holds finished network trials of the same model and dataset, each part is taken from them instead:

* training: median seconds per epoch per training image, apart for kappa = 0 and kappa > 0 (the penalty's
  double backward costs about 2.8x; with only one of the two measured, the other is scaled by 2.8);
* spectrum: median ``hessian_seconds`` per spectrum sample (``hessian_samples``), the same method;
* detection: median ``det_seconds`` of trials with the same ``detect`` and ``detect_baselines``.

Every estimate says which source it used. The measurements carry their machine's speed and thread count.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PENALTY_FACTOR = 2.8  # the rough model's cost of kappa > 0 over kappa = 0 (double backward)


# ----------------------------------------------------------------------------- the rough model
def train_size(dataset: str, subset: int = 0) -> int:
    """Training images a trial uses: the dataset's (its registry entry), or its ``train_subset`` when smaller."""
    from trainables.data.datasets import dataset_entry

    full = dataset_entry(dataset).train_size
    return min(full, subset) if subset else full


def _train_size(cfg) -> int:
    return train_size(cfg.dataset, getattr(cfg, "train_subset", 0))


def estimate_seconds(cfg) -> float:
    """A rough CPU cost of one trial (training, evaluation and spectrum); GPUs are much faster."""
    return sum(estimate_parts(cfg).values())


def estimate_parts(cfg) -> dict[str, float]:
    """The rough model's seconds of one trial by part: train, spectrum, detect (see :mod:`sweeper.costs`
    for estimates measured on finished trials)."""
    from trainables import trial_kind

    kind = trial_kind(getattr(cfg, "kind", "network"))
    if not kind.iterative:
        return {"train": kind.seconds, "spectrum": 0.0, "detect": 0.0}  # one dense computation, as the kind declares
    from trainables.data.datasets import dataset_entry
    from trainables.networks.models import model_entry

    d = dataset_entry(cfg.dataset).pixels
    per = model_entry(cfg.model).cost(cfg.model) * d / 3072  # the model registry's step cost, per 3072 values
    epochs = getattr(cfg, "total_epochs", cfg.epochs)  # a filtering defence trains twice
    train = epochs * _train_size(cfg) * per * (2.8 if cfg.kappa > 0 else 1.0) * 1.2
    n = min(cfg.hessian_samples, _train_size(cfg))
    if not cfg.hessian:
        spectrum = 0.0
    elif cfg.hessian_method in ("auto", "exact") and 24 * d * d <= cfg.hessian_dense_mb * 2**20:
        # exact path (every shipped model is piecewise linear): one forward + K backward passes,
        # the float64 Gram (N*K*D^2 flops) and eigh (~10 D^3), at ~1e10 flop/s
        spectrum = (cfg.num_classes + 1) * n * per + (n * cfg.num_classes * d * d + 10 * d**3) / 1e10
    else:
        spectrum = (cfg.hessian_iterations + 2) * n * per * 3
    return {"train": train, "spectrum": spectrum, "detect": _detection_seconds(cfg, per, n)}


def _detection_seconds(cfg, per: float, n: int) -> float:
    """Detection statistics and baselines: the sum of the ``cost`` each enabled detector and baseline
    declares in its registry entry (:func:`trainables.detection.statistics.detection_cost`), from the model's
    per-sample step time ``per``, the spectrum's ``n`` samples and the training set's size."""
    from trainables.detection.context import DetectionSettings
    from trainables.detection.statistics import detection_cost

    return detection_cost(DetectionSettings.from_config(cfg), per, n, _train_size(cfg))


# ----------------------------------------------------------------------------- measured on the store
@dataclass
class Measured:
    """Per-(model, dataset) medians of finished trials in a store."""

    train: dict[tuple, list[float]] = field(default_factory=lambda: defaultdict(list))  # (model, ds, penalised)
    spectrum: dict[tuple, list[float]] = field(default_factory=lambda: defaultdict(list))  # (model, ds, method)
    detect: dict[tuple, list[float]] = field(default_factory=lambda: defaultdict(list))  # (model, ds, baselines)
    n_trials: int = 0

    def add(self, params: dict[str, str], metrics: dict[str, float], train_size: int) -> None:
        """One finished trial: its config (MLflow params, strings) and final metrics."""
        try:
            model, ds = params["model"], params["dataset"]
            epochs, kappa = int(params["epochs"]), float(params["kappa"])
        except (KeyError, ValueError):
            return
        from trainables.config import total_epochs

        epochs = total_epochs(epochs, params.get("defence_filter", "none"))  # train_seconds holds both stages
        self.n_trials += 1
        if metrics.get("train_seconds", 0) > 0 and epochs > 0 and train_size > 0:
            self.train[(model, ds, kappa > 0)].append(metrics["train_seconds"] / (epochs * train_size))
        if metrics.get("hessian_seconds", 0) > 0 and metrics.get("hessian_samples", 0) > 0:
            method = params.get("hessian_method", "auto")
            self.spectrum[(model, ds, method)].append(metrics["hessian_seconds"] / metrics["hessian_samples"])
        if "det_seconds" in metrics and params.get("detect", "True") == "True":
            self.detect[(model, ds, params.get("detect_baselines", ""))].append(metrics["det_seconds"])


def measured_costs(uri: str | None) -> Measured:
    """The finished network trials of every sweep in the store at ``uri`` (empty when there is none).

    The embedded SQLite store is read directly, read-only (milliseconds; MLflow's client takes seconds
    to import); any other store is not read by ``plan``, which must not wait on a server.
    """
    from analysis.schema import read_sqlite
    from trainables.record import TAG_KIND, TAG_STATUS

    def read(con):
        runs = [
            r[0]
            for r in con.execute(
                "SELECT r.run_uuid FROM runs r "
                "JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = ? AND k.value = 'trial' "
                "JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = ? AND s.value = 'completed' "
                "WHERE r.lifecycle_stage = 'active'",
                (TAG_KIND, TAG_STATUS),
            )
        ]
        params: dict[str, dict[str, str]] = defaultdict(dict)
        metrics: dict[str, dict[str, float]] = defaultdict(dict)
        for run, key, value in con.execute("SELECT run_uuid, key, value FROM params"):
            params[run][key] = value
        for run, key, value in con.execute(
            "SELECT run_uuid, key, value FROM latest_metrics WHERE key IN "
            "('train_seconds', 'hessian_seconds', 'hessian_samples', 'det_seconds')"
        ):
            metrics[run][key] = value
        return runs, params, metrics

    out = Measured()
    found = read_sqlite(uri, read, timeout=5)
    if found is None:  # not the embedded store, no file yet, or another MLflow version: the rough model it is
        return out
    runs, params, metrics = found
    for run in runs:
        p = params.get(run, {})
        if not {"model", "dataset", "epochs"} <= set(p):  # the measured medians are per (model, dataset) epoch
            continue
        try:
            size = train_size(p["dataset"], int(p.get("train_subset", 0) or 0))
        except (KeyError, ValueError):
            continue
        out.add(p, metrics.get(run, {}), size)
    return out


def _median(values: list[float]) -> float:
    return statistics.median(values)


def estimate(cfg, measured: Measured) -> tuple[float, str]:
    """(seconds, source) of one trial: each part measured when the store has it, else the rough model."""

    rough = estimate_parts(cfg)
    if not hasattr(cfg, "epochs") or not hasattr(cfg, "model"):  # measured medians are per (model, dataset) epoch
        return sum(rough.values()), "model"
    parts, sources = dict(rough), []
    key = (cfg.model, cfg.dataset)
    size = train_size(cfg.dataset, cfg.train_subset)
    same, other = measured.train.get((*key, cfg.kappa > 0)), measured.train.get((*key, not cfg.kappa > 0))
    if same or other:
        per = _median(same) if same else _median(other) * (PENALTY_FACTOR if cfg.kappa > 0 else 1 / PENALTY_FACTOR)
        parts["train"] = per * getattr(cfg, "total_epochs", cfg.epochs) * size
        sources.append(f"train {len(same or other)}")
    spec = measured.spectrum.get((*key, cfg.hessian_method))
    if cfg.hessian and spec:
        parts["spectrum"] = _median(spec) * min(cfg.hessian_samples, size)
        sources.append(f"spectrum {len(spec)}")
    det = measured.detect.get((*key, cfg.detect_baselines))
    if (cfg.detect or cfg.detect_baselines) and det:
        parts["detect"] = _median(det)
        sources.append(f"detect {len(det)}")
    source = "measured (" + ", ".join(sources) + " trials)" if sources else "model"
    return sum(parts.values()), source


def store_uri(storage: str, mlflow_uri: str | None) -> str | None:
    """The store ``plan`` reads: ``--mlflow-uri``, else the embedded one under ``--storage`` if it exists."""
    if mlflow_uri:
        return mlflow_uri
    db = Path(storage).expanduser().absolute() / "mlflow.db"
    return f"sqlite:///{db}" if db.is_file() else None


def plan_costs(configs: list[Any], uri: str | None) -> tuple[list[float], list[str], int]:
    """Seconds and source of each config, and how many finished trials the store offered."""
    measured = measured_costs(uri)
    pairs = [estimate(c, measured) for c in configs]
    return [p[0] for p in pairs], [p[1] for p in pairs], measured.n_trials
