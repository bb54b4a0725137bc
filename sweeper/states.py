"""What each trial of a sweep ended as, read the same way by every view: the run's and resume's summary
(:func:`finish`), ``sweeper status`` (:func:`sweep_status`). A trial's own MLflow run decides; Ray says
which trials raised and which never started."""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from typing import Any

from analysis.schema import driver_alive, read_meta
from trainables import record
from trainables.config import SweeperError
from trainables.record import SweepMeta, trial_row, trial_status

from . import tracking
from .preflight import check_name, resolve_storage


@dataclass
class SweepReport:
    """What a sweep run or resume produced."""

    name: str
    path: str
    mlflow_uri: str
    experiment_id: str
    parent_run_id: str
    rows: list[dict[str, Any]]  # one per trial: config fields, final metrics, status
    counts: dict[str, int]
    varying: list[str] = dataclasses.field(default_factory=list)  # the fields that tell trials apart
    groups: list[str] | None = None  # one frontier per combination of these (None: the attack fields that vary)
    objectives: list[tuple[str, str]] | None = None  # the frontier's (metric, max|min); None: the trial kind's


# ----------------------------------------------------------------------------- sweep folder metadata
def sweep_path(storage: str, name: str) -> str:
    return f"{storage}/{name}"


def label_axes(meta: SweepMeta) -> list[str]:
    """The fields that tell a sweep's trials apart: its axes, and seed when seeds vary."""
    spec = meta.spec or {}
    axes = list(spec.get("axes", {}))
    if meta.kind == "search":  # a defence's seeds are part of it, not an axis
        return axes
    return axes + (["seed"] if spec.get("seeds") and "seed" not in axes else [])


def finish_sweep(meta: SweepMeta, grid) -> SweepReport:
    """Rows and counts of a sweep whose tuner returned, its parent run closed with the counts.

    Ray knows which trials raised and which stopped part-way; a trial's own MLflow run knows
    whether it finished (the trial writes that last, so it wins: a trial that finished after an
    interrupt but before Ray recorded it is completed, and a resume never re-runs it).
    """
    from analysis.results import CONFIG_FIELDS, pending_rows
    from trainables.config import threat_fields

    search = meta.kind == "search"
    attack = set(threat_fields())  # the declarations read once, not per trial and field
    stored = _mlflow_states(meta, "defence" if search else "trial")
    rows = []
    for res in grid:
        cfg = (res.config or {}).get("trial", {})
        if not cfg:  # never started (the sweep was interrupted first): counted as pending below
            continue
        metrics = {k: v for k, v in (res.metrics or {}).items() if k != "models_json"}
        if search:  # a defence: its own fields (the threats are in every row of its models)
            from .defence_search import defence_config

            key = metrics.get("trial_key") or record.trial_key(defence_config(cfg, meta.search), meta.key_format)
            cfg = {k: v for k, v in cfg.items() if k not in attack and k != "seed"}
        else:
            key = metrics.get("trial_key") or record.trial_key(_full_config(cfg), meta.key_format)
        run = stored.get(key)
        if run is not None and not (res.error is not None and run[0] == "running"):
            status = _tuner_returned(run[0])  # the trial's own record decides, as `sweeper status` reads it
            if status in record.FINAL_STATUSES:
                metrics = {**metrics, **run[1]}
        elif res.error is not None:  # it raised (and its retries too): failed, never "interrupted"
            status = "failed"
        else:
            status = "interrupted" if metrics.get("status") == "running" else metrics.get("status", "pending")
        error = error_text(res.error, metrics) if status == "failed" else ""
        metrics = {k: v for k, v in metrics.items() if k not in ("error", "deterministic")}
        row = {**trial_row(cfg, metrics, CONFIG_FIELDS), "trial_key": key, "status": status, "error": error}
        rows.append(row)
    seen = {r["trial_key"] for r in rows}
    owed = pending_rows(meta) if meta.trials is not None else pending_rows(meta)[len(rows) :]  # a search owes a count
    rows += [r for r in owed if r["trial_key"] not in seen]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "diverged", "failed", "interrupted")}
    counts["pending"] = int(meta.n_trials) - sum(counts.values())
    counts["total"] = int(meta.n_trials)
    done = counts["completed"] + counts["diverged"] == counts["total"]
    if search and counts["interrupted"] == 0 and counts["pending"] == 0:  # nothing left for Tune to resume
        _close_orphans(meta)
    tracking.finish_parent(
        meta.mlflow_uri,
        meta.parent_run_id,
        "completed" if done else "incomplete",
        {f"n_{k}": v for k, v in counts.items()},
    )
    return SweepReport(
        meta.name,
        sweep_path(meta.storage, meta.name),
        meta.mlflow_uri,
        meta.experiment_id,
        meta.parent_run_id,
        rows,
        counts,
        label_axes(meta),
        summary_groups(meta),
        _objectives(meta),
    )


def error_text(error: BaseException | None, metrics: dict[str, Any]) -> str:
    """A failed trial's own message: the one it reported, else the cause inside Ray's wrapper (whose
    first line is only ``ray::ImplicitFunc.train() (pid=...)``)."""
    if metrics.get("error"):
        return str(metrics["error"])[:300]
    if error is None:
        return ""
    cause = getattr(error, "cause", None) or error
    first = next((ln for ln in str(cause).splitlines() if ln.strip()), "")
    return f"{type(cause).__name__}: {first}"[:300]


def _close_orphans(meta: SweepMeta) -> None:
    """Mark FAIL the Optuna trials still RUNNING once the tuner returned: a driver killed after
    Optuna proposed a defence but before Tune saved its state leaves one behind (the restored
    searcher proposes again, and the defence's MLflow run and models are found by its key)."""
    import optuna

    study = optuna.load_study(study_name=meta.name, storage=meta.search["optuna_storage"])
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_system_attr(t._trial_id, "sweeper", "orphaned by an interrupted driver")
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)


def _objectives(meta: SweepMeta) -> list[tuple[str, str]] | None:
    """A search's objectives (metric, direction); None: the trial kind's."""
    if meta.kind != "search":
        return None
    from trainables.record import stored_objectives

    return [(o.metric, o.direction) for o in stored_objectives(meta.search)]


def summary_groups(meta: SweepMeta) -> list[str] | None:
    """A search draws one frontier over its defences (the threats are aggregated in every row); a
    grid one per attack field that varies (None lets the analysis decide from the rows)."""
    return [] if meta.kind == "search" else None


def _tuner_returned(status: str) -> str:
    """A trial status once no driver runs it any more: a run still marked running was interrupted."""
    return trial_status(status, alive=False)


def _full_config(trial: dict[str, Any]) -> dict[str, Any]:
    from trainables import make_config

    return make_config(trial).to_dict()


def _mlflow_states(meta: SweepMeta, kind: str = "trial") -> dict[str, tuple[str, dict[str, float]]]:
    """trial key -> (status tag, final metrics) of the sweep's child runs (``kind`` 'defence': a
    search's defence runs); empty if MLflow is down."""
    from analysis.schema import trial_runs

    def _do():
        return {
            r.data.tags.get(record.TAG_KEY): (r.data.tags.get(record.TAG_STATUS, "running"), dict(r.data.metrics))
            for r in trial_runs(meta.mlflow_uri, meta.experiment_id, kind)
        }

    return tracking.retry(_do, "reading the trials' states", attempts=2) or {}


def sweep_status(name: str, storage: str = "./sweeps") -> dict[str, Any]:
    """Trials completed / diverged / failed / running / interrupted / pending of a sweep.

    Each trial's status is its MLflow run's, as in every other view; a trial still marked running
    whose driver process is gone counts as interrupted; a trial without a run yet is pending.
    """
    from analysis.schema import trial_statuses

    check_name(name)
    storage = resolve_storage(storage)
    meta = read_meta(storage, name)
    if meta is None:
        raise SweeperError(f"no sweep {name!r} in {storage}")
    tracking.check_uri(meta.mlflow_uri)
    kind = "defence" if meta.kind == "search" else "trial"  # a search owes defences
    states = trial_statuses(meta.mlflow_uri, meta.experiment_id, kind) if meta.experiment_id else {}
    if meta.trials is not None:  # a grid: only its own trials count (keys of other sweeps never do)
        states = {t["key"]: states[t["key"]] for t in meta.trials if t["key"] in states}
    by = {s: 0 for s in ("completed", "diverged", "failed", "running", "interrupted", "pending")}
    live = driver_alive(meta)
    for s in states.values():
        s = trial_status(s, live)  # the rule frontier and report apply too
        by[s] = by.get(s, 0) + 1
    by["pending"] = max(0, int(meta.n_trials) - len(states))
    by["total"] = meta.n_trials
    return {"name": name, "path": sweep_path(storage, name), "mlflow_uri": meta.mlflow_uri, **by}


def this_driver() -> dict[str, Any]:
    """Host and pid of this process, recorded as the sweep's driver (run and each resume)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}
