"""Sweeps as tidy pandas frames: one row per trial, and per-epoch histories in long form.

Two sources, same columns: MLflow (the sweep's experiment on any tracking URI) and, when no
MLflow is at hand, the sweep's Ray Tune folder (``params.json`` / ``result.json`` per trial).
Config columns carry the TrialConfig types (floats, ints, bools, strings) under the fields' own
names; a metric named like a config field is renamed (:mod:`analysis.schema`), so the ``penalty``
column is the penalty convention that ran and ``penalty_value`` the last epoch's penalty. Every
trial appears, whatever its status (completed, diverged, failed, running, interrupted), and the
trials a sweep owes but never started appear as ``pending`` (from the sweep's ``sweeper.json``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from trainables.config import SweeperError
from trainables.fields import EXTRA_FIELDS, specs, value_type
from trainables.plugins import load_plugins

from . import schema


def _all_fields() -> dict[str, type]:
    """Every trial kind's declared field -> the type its declaration gives (plugin fields included)."""
    from trainables import TRIAL_KINDS

    out: dict[str, type] = {}
    for kind in reversed(list(TRIAL_KINDS.values())):  # network last: its types win on shared names
        out.update({name: value_type(d.spec) for name, d in specs(kind.config()).items()})
    return out


CONFIG_FIELDS = _all_fields()  # at import; config_fields() adds what plugins declared since


def config_fields() -> dict[str, type]:
    """Every declared field -> its type, plugin fields included (SWEEPER_PLUGINS / entry points loaded first)."""
    load_plugins()
    return {**CONFIG_FIELDS, **{name: value_type(e.spec) for name, e in EXTRA_FIELDS.items()}}


HISTORY_METRICS = (
    "train_loss",
    "penalty",
    "train_acc",
    "clean_acc",
    "asr",
    "fisher_trace",
    "n_poisoned",
    "lr",
    "lambda_1",
    "eig_gap",
    "overlap_sq",
    "max_overlap_sq",
)


def _typed(name: str, text: Any) -> Any:
    """An MLflow param string back to the type of the field's declaration."""
    if not isinstance(text, str):
        return text
    if text == "None":
        return None
    kind = CONFIG_FIELDS.get(name) or (value_type(EXTRA_FIELDS[name].spec) if name in EXTRA_FIELDS else str)
    try:
        if kind is bool:
            return text == "True"
        if kind is int:
            return int(float(text))
        if kind is float:
            return float(text)
    except ValueError:
        return text
    return text


def sweep_meta(name: str, storage: str | Path = "./sweeps") -> schema.SweepMeta | None:
    """The sweep's ``sweeper.json`` (MLflow URI, ids, grid), or None; local folders and URIs alike."""
    return schema.read_meta(storage, name)


def _experiment_runs(uri: str, name: str) -> tuple[list[schema.RunRecord], list[schema.RunRecord]]:
    """(trial runs, sweep parent runs) of experiment ``name``: one read of the store (:func:`schema.experiment_runs`)."""
    runs = schema.experiment_runs(uri, name)
    trials = [r for r in runs if r.tags.get(schema.TAG_KIND) == "trial"]
    parents = [r for r in runs if r.tags.get(schema.TAG_KIND) == "sweep"]
    return trials, parents


def results_from_mlflow(name: str, uri: str) -> pd.DataFrame:
    """One row per trial run of sweep ``name`` at tracking ``uri``."""
    trials, _ = _experiment_runs(uri, name)
    rows, fields = [], config_fields()
    for r in trials:
        tags = r.tags
        row = {
            "sweep": name,
            "run_id": r.run_id,
            "trial_key": tags.get(schema.TAG_KEY),
            "trial_id": tags.get(schema.TAG_TRIAL_ID),
            "status": tags.get(schema.TAG_STATUS, "running"),
            "error": tags.get(schema.TAG_ERROR, ""),
        }
        if schema.TAG_DEFENCE in tags:  # a model of a defence search
            row["defence_key"] = tags[schema.TAG_DEFENCE]
        config = {k: _typed(k, v) for k, v in r.params.items()}
        row.update(schema.trial_row(config, r.metrics, fields))
        rows.append(row)
    return _tidy(pd.DataFrame(rows))


def results_from_ray(name: str, storage: str | Path = "./sweeps") -> pd.DataFrame:
    """One row per trial folder of the sweep's Ray Tune experiment (no MLflow needed)."""
    folder = schema.local_folder(storage, name)
    if folder is None:
        raise SweeperError(
            f"--storage {storage} is remote: the Ray folder can be read only from a local path or file:// URI"
        )
    if not folder.is_dir():
        raise SweeperError(f"no sweep folder {folder}")
    rows, fields = [], config_fields()
    for tdir in sorted(p for p in folder.iterdir() if p.is_dir() and (p / "params.json").is_file()):
        cfg = json.loads((tdir / "params.json").read_text()).get("trial", {})
        results = _read_results(tdir)
        last = results[-1] if results else {}
        status = last.get("status", "pending" if not results else "running")
        if (tdir / "error.txt").is_file() or (tdir / "error.pkl").is_file():
            status = "failed" if status not in ("completed", "diverged") else status
        if isinstance(last.get("models_json"), str):  # a defence of a search: one row per model it trained
            rows += [
                {
                    "sweep": name,
                    "run_id": m.get("mlflow_run_id"),
                    "trial_id": tdir.name.removeprefix("trial_"),
                    "error": "",
                    **m,
                }
                for m in json.loads(last["models_json"])
            ]
            continue
        if "models_done" in last:  # a defence that has not finished: its models are known to MLflow only
            continue
        row = {
            "sweep": name,
            "run_id": last.get("mlflow_run_id"),
            "trial_key": last.get("trial_key") or _key_of(cfg),
            "trial_id": last.get("trial_id", tdir.name.removeprefix("trial_")),
            "status": status,
            "error": "",
        }
        metrics = {}  # each metric's latest value, as MLflow keeps it: an epoch between evaluations has no scores
        for r in results:
            metrics.update({k: v for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool)})
        row.update(schema.trial_row(cfg, metrics, fields))
        rows.append(row)
    return _tidy(pd.DataFrame(rows))


def _key_of(trial: dict[str, Any]) -> str | None:
    """The trial key of a Ray ``params.json`` trial dict (as the trial computes it)."""
    from trainables import make_config

    try:
        return schema.trial_key(make_config(trial).to_dict())
    except SweeperError:
        return None


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


DERIVED_CONFIG = ("defence_family",)  # columns computed from config fields: they name configurations too


def defence_family(filter_name: Any, kappa: Any, augment: Any) -> str:
    """A trial's defence family, as frontiers label it: ``filter ss``, ``penalty``, ``augment``, joined by
    `` + `` (``filter curvature + penalty``), or ``none``."""
    parts = []
    if isinstance(filter_name, str) and filter_name not in ("", "none"):
        parts.append(f"filter {filter_name}")
    if isinstance(kappa, int | float) and not pd.isna(kappa) and kappa > 0:
        parts.append("penalty")
    if augment is True or str(augment).lower() == "true":
        parts.append("augment")
    return " + ".join(parts) or "none"


def _tidy(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    df["kind"] = df["kind"].fillna("network") if "kind" in df.columns else "network"
    if "defence_filter" in df.columns and df["defence_filter"].fillna("none").ne("none").any():
        # a sweep over filtering defences: each point says its family (filter, penalty, both)
        df["defence_family"] = [
            defence_family(f, k, a)
            for f, k, a in zip(
                df["defence_filter"],
                df.get("kappa", pd.Series(0.0, index=df.index)),
                df.get("augment", pd.Series(False, index=df.index)),
                strict=True,
            )
        ]
    first = [c for c in ("sweep", "status", "theta", "kappa", "augment", "epochs", "seed") if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]].reset_index(drop=True)


def pending_rows(meta: schema.SweepMeta | None) -> list[dict[str, Any]]:
    """Rows for every trial a sweep owes (from its ``sweeper.json``), all with status ``pending``.

    Callers drop those whose ``trial_key`` already has a row. A search owes ``n_trials`` trials
    whose configs are not known in advance: those rows carry the status alone.
    """
    if meta is None:
        return []
    if meta.trials is not None:  # a pending row shows the config it will run: defaults < fixed fields < its axes
        spec = meta.spec or {}
        known = {k: v for k, v in schema.field_defaults(spec.get("kind", "network")).items() if k != "kind"}
        base = {**known, **(spec.get("fixed") or {})}
        return [
            {**base, "sweep": meta.name, "trial_key": t["key"], "status": "pending", "error": "", **t["point"]}
            for t in meta.trials
        ]
    return [
        {"sweep": meta.name, "trial_key": f"pending-{i}", "status": "pending", "error": ""}
        for i in range(int(meta.n_trials))
    ]


def _with_pending(df: pd.DataFrame, meta: schema.SweepMeta | None) -> pd.DataFrame:
    """``df`` plus a pending row for each trial of the sweep that has no row yet."""
    if meta is None:
        return df
    if meta.trials is not None:
        seen = set(df["trial_key"]) if "trial_key" in df.columns else set()
        extra = [r for r in pending_rows(meta) if r["trial_key"] not in seen]
    else:  # a search: only a count of defences is owed
        seen = df["defence_key"].nunique() if "defence_key" in df.columns else len(df)
        extra = pending_rows(meta)[seen:]
    if not extra:
        return df
    return _tidy(pd.concat([df, pd.DataFrame(extra)], ignore_index=True) if not df.empty else pd.DataFrame(extra))


def load_results(
    name: str, storage: str | Path = "./sweeps", mlflow_uri: str | None = None, source: str = "auto"
) -> pd.DataFrame:
    """A sweep's trials as a DataFrame, one row per trial it owes (never-started ones as ``pending``).

    Statuses follow the rule every view shares (:func:`analysis.schema.trial_status`): a trial still
    marked running whose driver process is gone is ``interrupted``, as ``sweeper status`` counts it.

    ``source``: ``mlflow``, ``ray`` (the sweep's Ray Tune folder, no MLflow needed) or ``auto``
    (MLflow when it answers within seconds, else the Ray folder). ``df.attrs["source"]`` says
    which was read, and why when ``auto`` fell back.
    """
    if source not in ("auto", "mlflow", "ray"):
        raise SweeperError(f"source={source!r} is invalid: must be auto, mlflow or ray")
    meta = sweep_meta(name, storage)
    uri = mlflow_uri or (meta.mlflow_uri if meta else None)
    if source == "ray" or (source == "auto" and uri is None):
        df = results_from_ray(name, storage)
        df.attrs["source"] = "ray"
        return _settled(_keep_attrs(df, _with_pending(df, meta)), meta)
    if uri is None:
        raise SweeperError(f"no MLflow URI for sweep {name!r}: pass --mlflow-uri (no sweeper.json in {storage})")
    try:
        schema.check_uri(uri)  # seconds, not MLflow's minutes of retries against a dead server
        df = results_from_mlflow(name, uri)
        df.attrs["source"] = f"mlflow {uri}"
    except SweeperError as e:
        if source == "mlflow" or meta is None:
            raise
        df = results_from_ray(name, storage)
        df.attrs["source"] = f"ray (MLflow unavailable: {e})"
    except Exception as e:
        if source == "mlflow":
            raise SweeperError(f"MLflow at {uri} failed: {str(e).splitlines()[0]}") from None
        df = results_from_ray(name, storage)
        df.attrs["source"] = f"ray (MLflow failed: {str(e).splitlines()[0]})"
    return _settled(_keep_attrs(df, _with_pending(df, meta)), meta)


def _keep_attrs(src: pd.DataFrame, dst: pd.DataFrame) -> pd.DataFrame:
    dst.attrs.update(src.attrs)
    return dst


def _settled(df: pd.DataFrame, meta: schema.SweepMeta | None) -> pd.DataFrame:
    """Each row's status as ``sweeper status`` counts it (:func:`analysis.schema.trial_status`): a trial
    still marked running whose driver process is gone is interrupted."""
    if df.empty or "status" not in df.columns or not (df["status"] == "running").any():
        return df
    alive = schema.driver_alive(meta)
    df["status"] = [schema.trial_status(s, alive) for s in df["status"]]
    return df


def completed(df: pd.DataFrame) -> pd.DataFrame:
    """Trials with final metrics (completed); diverged, failed and unfinished ones are listed apart."""
    return df[df["status"] == "completed"] if "status" in df.columns else df


def unfinished(df: pd.DataFrame) -> pd.DataFrame:
    """Every trial that is not completed (diverged, failed, interrupted, pending)."""
    return df[df["status"] != "completed"] if "status" in df.columns else df.iloc[:0]


def default_groups(df: pd.DataFrame) -> list[str]:
    """Frontiers are per attack (the attacker's choices that vary among the completed trials:
    theta, trigger, poison mode...), else global; the kind's registry names the attack fields."""
    from trainables import trial_kind

    ok = completed(df)
    kind = str(ok["kind"].iloc[0]) if "kind" in ok.columns and len(ok) else "network"
    groups = [c for c in trial_kind(kind).attack_fields if c in ok.columns and ok[c].nunique() > 1]
    if groups and ok.groupby(groups).size().max() < 2:
        # nothing but attack fields varies (a kernel sweep over m and r): per-attack frontiers would each hold
        # one trial, so the trials are compared with each other on one frontier
        return []
    return groups


def sweep_kind(df: pd.DataFrame) -> str:
    """The trial kind of a results frame (network, kernel, linear)."""
    kinds = df["kind"].dropna().unique() if "kind" in df.columns else []
    return str(kinds[0]) if len(kinds) else "network"


def concat_results(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Several sweeps in one frame (the ``sweep`` column tells them apart)."""
    return pd.concat([f for f in frames if not f.empty], ignore_index=True) if frames else pd.DataFrame()


def load_history(
    name: str,
    storage: str | Path = "./sweeps",
    mlflow_uri: str | None = None,
    metrics: tuple[str, ...] = HISTORY_METRICS,
    source: str = "auto",
) -> pd.DataFrame:
    """Per-epoch metrics in long form: columns sweep, run_id, trial_key, epoch, metric, value."""
    meta = sweep_meta(name, storage)
    uri = mlflow_uri or (meta.mlflow_uri if meta else None)
    rows = []
    if source != "ray" and uri is not None:
        schema.check_uri(uri)  # seconds, not MLflow's minutes of retries against a dead server
        trials, _ = _experiment_runs(uri, name)
        keys = {r.run_id: r.tags.get(schema.TAG_KEY) for r in trials}
        points = schema.sqlite_histories(uri, name, tuple(metrics))  # one query on the embedded store
        if points is None:  # any other store: one call per run and metric
            c = schema.client(uri)
            points = [(r, m, p.step, p.value) for r in keys for m in metrics for p in c.get_metric_history(r, m)]
        rows = [
            {"sweep": name, "run_id": r, "trial_key": keys[r], "epoch": step, "metric": m, "value": value}
            for r, m, step, value in points
            if r in keys  # trial runs only (the sweep's parent run logs metrics too)
        ]
        # one order whichever way the points were read: run, metric, epoch
        rows.sort(key=lambda row: (row["run_id"], row["metric"], row["epoch"]))
    else:
        folder = schema.local_folder(storage, name)
        for tdir in sorted(p for p in folder.iterdir() if p.is_dir()):
            for res in _read_results(tdir):
                if res.get("status") != "running" and "epoch" not in res:
                    continue
                for m in metrics:
                    if (
                        m in res
                        and isinstance(res[m], int | float)
                        and not (isinstance(res[m], float) and math.isnan(res[m]))
                    ):
                        rows.append(
                            {
                                "sweep": name,
                                "run_id": res.get("mlflow_run_id"),
                                "trial_key": res.get("trial_key"),
                                "epoch": res.get("epoch"),
                                "metric": m,
                                "value": res[m],
                            }
                        )
        df = pd.DataFrame(rows)
        return df.drop_duplicates(["trial_key", "epoch", "metric"], keep="first") if not df.empty else df
    return pd.DataFrame(rows, columns=["sweep", "run_id", "trial_key", "epoch", "metric", "value"])


def parent_run_id(name: str, uri: str) -> str | None:
    """The sweep's parent MLflow run."""
    _, parents = _experiment_runs(uri, name)
    return parents[0].run_id if parents else None
