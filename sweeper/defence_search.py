"""Defence search: the threat set out of the search space, and the Tune trial that evaluates one
defence against every threat.

Scheduling (see the README, "Searching defences"): one Ray Tune trial per *defence*, which fans
its models (threat × seed) out as Ray tasks and reports the aggregated objectives once. The trial
itself holds no CPU (its models do), so Ray packs the models of all running defences onto the
cluster as resources free up: a slow threat of one defence never idles a CPU another defence's
model could use. Ray Tune's stock ``OptunaSearch`` sees one trial per defence, exactly one Optuna
trial, and its state is restored with the experiment. On resume, the interrupted defence trial
starts again: its finished models are recognised in MLflow (by their config's key) and never
re-run, unfinished ones continue from their last epoch checkpoint under ``<sweep>/models/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from analysis.defence_table import aggregate_models
from trainables import record
from trainables.config import SweeperError, TrialConfig, threat_fields
from trainables.record import DEFENCE_KEY, stored_objectives, threat_label, threats_json, trial_row

from . import tracking
from .search_space import SearchSpec
from .spaces import SpaceError

WHY_FIXED = (
    "the threat is the attacker's choice, not the defender's: searched, the optimiser would simply "
    "pick the weakest attack (a smaller theta always lowers ASR)"
)


def split_threats(spec: SearchSpec) -> tuple[dict[str, list[Any]], SearchSpec]:
    """The listed threat values (fields given as lists) and the defence-only space.

    A threat field given as a range is refused with the reason; so is a searched seed (``--seeds N``
    averages seeds instead).
    """
    attack = set(threat_fields())  # read the declarations once, not per field
    for name, (dist, lo, hi) in spec.continuous.items():
        if name in attack:
            rng = f"{'log:' if dist == 'log' else ''}{lo:g}:{hi:g}"
            raise SpaceError(
                f"--{name.replace('_', '-')}={rng} is a range, but {name} is part of the threat and must "
                f"be fixed or a list (e.g. --{name.replace('_', '-')} {lo:g},{hi:g}): {WHY_FIXED}"
            )
    if "seed" in spec.continuous or "seed" in spec.categorical:
        raise SpaceError("seed cannot be searched: use --seeds N to evaluate every defence on N seeds (averaged)")
    threats = {k: v for k, v in spec.categorical.items() if k in attack}
    defence = SearchSpec(
        continuous=dict(spec.continuous),
        categorical={k: v for k, v in spec.categorical.items() if k not in attack},
        fixed=dict(spec.fixed),
    )
    return threats, defence


def check_models(defence: SearchSpec, threats: list[dict[str, Any]], seeds: list[int]) -> None:
    """Every threat × seed on every corner of the defence space is a valid trial (before Ray starts)."""
    for corner in defence.corner_configs():
        base = corner.to_dict()
        for threat in threats:
            try:
                TrialConfig.from_dict({**base, **threat, "seed": seeds[0]})
            except SweeperError as e:
                raise SpaceError(f"{e}" + (f" (threat {threat_label(threat)})" if threat else "")) from None


def defence_config(base: dict[str, Any], search: dict[str, Any]) -> dict[str, Any]:
    """What identifies a defence: every non-threat field, the threat set and the seeds."""
    attack = threat_fields()
    d = {k: v for k, v in base.items() if k not in attack and k != "seed"}
    fixed = {k: base[k] for k in attack if k in base}  # the threat's fixed values, then its lists
    d["threats"] = threats_json([{**fixed, **t} for t in search["threats"]])
    d["seeds"] = ",".join(map(str, search["seeds"]))
    return d


def model_configs(base: dict[str, Any], search: dict[str, Any]) -> list[dict[str, Any]]:
    """The full trial config of every (threat, seed) model of a defence."""
    return [
        TrialConfig.from_dict({**base, **threat, "seed": seed}).to_dict()
        for threat in search["threats"]
        for seed in search["seeds"]
    ]


# ----------------------------------------------------------------------------- inside Ray
def defence_trainable(config: dict[str, Any]) -> None:
    """One defence: train its models (threat × seed) as Ray tasks, report the aggregated objectives."""
    import ray
    from ray import tune
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    sweep, base = config["sweep"], dict(config["trial"])
    search = sweep["defence"]
    objectives = stored_objectives(search)
    trial_id = tune.get_context().get_trial_id()
    tracker = tracking.TrialTracker(
        sweep["mlflow_uri"],
        sweep["experiment_id"],
        sweep["parent_run_id"],
        sweep["name"],
        defence_config(base, search),
        trial_id,
        tracking.run_label(base, sweep.get("axes", [])),
        kind="defence",
        key_format=sweep.get("key_format", 1),
    )
    nan = {o.metric: float("nan") for o in objectives}
    # a defence that finished before an interrupt Ray never recorded fans out too: each of its models
    # finds its finished run and returns at once, so the report carries every model's row again
    models = model_configs(base, search)
    task = ray.remote(_model_task).options(
        num_cpus=sweep["cpus_per_model"],
        num_gpus=sweep["gpus_per_model"],
        max_retries=0,
        # out of the defence trial's (CPU-less) placement group: the models take the cluster's free slots
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )
    varying = [f for f in search["threat_fields"]] + (["seed"] if len(search["seeds"]) > 1 else [])
    refs = {
        task.remote(
            m,
            sweep,
            tracker.run_id or sweep["parent_run_id"],
            tracker.key,
            tracking.run_label(m, varying) or "model",
            f"{trial_id}/{i}",
        ): i
        for i, m in enumerate(models)
    }
    rows: list[dict[str, Any] | None] = [None] * len(models)
    errors: list[BaseException] = []
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            i = refs[ref]
            try:
                rows[i] = ray.get(ref)
            except Exception as e:  # the model's run is marked failed by the task; the others finish first
                errors.append(e)
                rows[i] = {**{k: models[i].get(k) for k in varying}, "status": "failed"}
        if pending:
            tune.report(
                {
                    **nan,
                    "status": "running",
                    "trial_key": tracker.key,
                    "models_done": len(models) - len(pending),
                    "n_models": len(models),
                }
            )
    if errors:
        tracker.log_failure(errors[0])
        raise errors[0]  # Tune retries the defence (max_failures); its finished models are kept
    import pandas as pd

    agg, _ = aggregate_models(pd.DataFrame(rows), objectives, search["threat_fields"], len(models))
    from types import SimpleNamespace

    numeric = {k: v for k, v in agg.items() if k != "status"}
    tracker.log_final(
        SimpleNamespace(metrics=numeric, history=[], artifacts={}, status=agg["status"], diverged_epoch=None)
    )
    tune.report(
        {
            **nan,
            **agg,
            "trial_key": tracker.key,
            "diverged": int(agg["status"] == "diverged"),
            "mlflow_run_id": tracker.run_id or "",
            "models_done": len(models),
            "n_models": len(models),
            "models_json": json.dumps(rows, default=str),
        }
    )  # a string: Tune's loggers take no lists of dicts


def _model_task(
    trial: dict[str, Any], sweep: dict[str, Any], parent_run_id: str, defence_key: str, label: str, trial_id: str
) -> dict[str, Any]:
    """One model of a defence, as a Ray task: logged as a child run of the defence's run, checkpointed
    every epoch under ``<sweep>/models/<key>.pt`` (a resume continues from there). Returns its row."""
    import logging

    import torch

    from trainables.training.train import Trial

    logging.getLogger("ray").setLevel(logging.WARNING)
    cfg = TrialConfig.from_dict(trial)
    torch.set_num_threads(cfg.threads)
    tracker = tracking.TrialTracker(
        sweep["mlflow_uri"],
        sweep["experiment_id"],
        parent_run_id,
        sweep["name"],
        cfg.to_dict(),
        trial_id,
        label,
        tags={record.TAG_DEFENCE: defence_key},
        key_format=sweep.get("key_format", 1),
    )

    def row(metrics: dict[str, Any], status: str) -> dict[str, Any]:  # metrics never overwrite config fields
        return {
            **trial_row(trial, metrics, set(trial)),
            DEFENCE_KEY: defence_key,
            "trial_key": tracker.key,
            "status": status,
            "mlflow_run_id": tracker.run_id or "",
        }

    if tracker.finished:
        return row(tracker.final_metrics, tracker.final_status)
    ckpt = Path(sweep["models_dir"]) / f"{tracker.key}.pt"
    model = Trial(cfg)
    if ckpt.is_file():
        model.load(ckpt)

    def checkpoint(_metrics: dict[str, Any]) -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(f".{os.getpid()}.tmp")  # one writer per process, even for a repeated defence
        model.save(tmp)
        os.replace(tmp, ckpt)  # atomic: an interrupt never leaves half a checkpoint

    result = tracking.train_tracked(model, tracker, checkpoint)
    ckpt.unlink(missing_ok=True)
    return row(result.metrics, result.status)
