"""Analysis speed on synthetic populations: ``detect``, ``frontier`` and ``report`` through the library.

Builds an embedded MLflow store (SQLite, through MLflow's own client) holding one sweep of N models
whose tags, params and metrics are those of a real digits trial (trained here for one epoch, detection
statistics and the SS/AC baselines included), jittered per model: theta in {0, 0.02, 0.05, 0.1} ×
kappa in {0, 400} × N/8 seeds, the statistics of poisoned models shifted so the AUROCs are not trivial,
and five epochs of history per run. Then times, each the best of ``--repeats`` calls:

* reading the sweep (``load_results``): the direct SQLite read against MLflow's client (a ratio);
* ``detect_sweep`` with 1,000 bootstrap resamples (targets, issue 24: <= 1 s at 100 models, <= 5 s at 1,000);
* ``sweep_frontier`` (target <= 1 s at 1,000 models);
* ``write_report`` at 100 models (target <= 10 s; figures included, the report logged to MLflow).

    python benchmarks/analysis_speed.py [--n 100,1000] [--repeats 2] [--keep DIR]

(Not ``benchmarks/analysis.py``: run as a script, that name would shadow the ``analysis`` package for
every benchmark in this folder.)
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np

THETAS = (0.0, 0.02, 0.05, 0.1)
KAPPAS = (0.0, 400.0)
HISTORY = ("train_loss", "penalty", "train_acc", "clean_acc", "asr", "lr")


def template() -> tuple[dict, dict]:
    """(config, final metrics) of one real digits trial: one epoch, every default statistic, SS and AC."""
    from trainables.config import TrialConfig
    from trainables.training.train import run_trial

    cfg = TrialConfig(theta=0.1, epochs=1, detect_baselines="ss,ac")
    res = run_trial(cfg)
    metrics = {k: float(v) for k, v in res.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return cfg.to_dict(), metrics


def build_store(root: Path, name: str, n: int, cfg0: dict, m0: dict, seed: int = 0) -> float:
    """A sweep ``name`` of ``n`` completed models in ``root`` (store + ``sweeper.json``); seconds taken."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from analysis.schema import write_meta
    from trainables import record
    from trainables.detection.statistics import score_direction

    t0 = time.perf_counter()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment(name, artifact_location=str(root / "mlartifacts"))
    parent = c.create_run(exp, tags={record.TAG_KIND: "sweep", record.TAG_SWEEP: name}).info.run_id
    rng = np.random.default_rng(seed)
    seeds = max(1, n // (len(THETAS) * len(KAPPAS)))
    trials = []
    for theta in THETAS:
        for kappa in KAPPAS:
            for s in range(seeds):
                cfg = {**cfg0, "theta": theta, "kappa": kappa, "seed": s}
                key = record.trial_key(cfg, record.KEY_FORMAT)
                trials.append({"key": key, "point": {"theta": theta, "kappa": kappa, "seed": s}})
                run = c.create_run(
                    exp,
                    run_name=f"theta={theta} kappa={kappa} seed={s}",
                    tags={
                        record.TAG_KIND: "trial",
                        record.TAG_SWEEP: name,
                        record.TAG_KEY: key,
                        record.TAG_PARENT_RUN: parent,
                        record.TAG_TRIAL_ID: f"t{len(trials):05d}",
                        record.TAG_STATUS: "completed",
                    },
                ).info.run_id
                now = int(time.time() * 1000)
                metrics = []
                for k, v in m0.items():
                    if not math.isfinite(v):
                        val = v
                    else:
                        val = v * (1 + 0.1 * rng.standard_normal())
                        if theta > 0 and score_direction(k) == "higher":  # poisoned models score higher
                            val += abs(v) * theta * 10 * rng.random()
                    metrics.append(Metric(k, float(val), now, 5))
                metrics.append(Metric("asr", float(min(1.0, theta * 10 * rng.random())), now, 5))
                for epoch in range(1, 5):
                    metrics += [Metric(k, float(rng.random()), now, epoch) for k in HISTORY]
                params = [Param(k, str(v)) for k, v in sorted(cfg.items())]
                for i in range(0, len(params), 100):
                    c.log_batch(run, params=params[i : i + 100])
                for i in range(0, len(metrics), 1000):
                    c.log_batch(run, metrics=metrics[i : i + 1000])
                c.set_terminated(run, "FINISHED")
    spec = {"axes": {"theta": list(THETAS), "kappa": list(KAPPAS), "seed": list(range(seeds))}, "fixed": {}}
    meta = record.SweepMeta(
        name=name,
        storage=str(root),
        mlflow_uri=uri,
        spec=spec,
        n_trials=len(trials),
        trials=trials,
        experiment_id=exp,
        parent_run_id=parent,
        key_format=record.KEY_FORMAT,
    )
    write_meta(root, name, meta)
    return time.perf_counter() - t0


def best(fn, repeats: int) -> float:
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="100,1000", help="population sizes, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--keep", default=None, help="build the stores in this folder and keep them")
    args = ap.parse_args()
    from analysis import roc, schema
    from analysis.detect import detect_sweep
    from analysis.frontier import sweep_frontier
    from analysis.report import write_report
    from analysis.results import load_results

    t0 = time.perf_counter()
    cfg0, m0 = template()
    print(f"template trial: {len(cfg0)} params, {len(m0)} final metrics ({time.perf_counter() - t0:.1f} s)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep or tmp)
        for n in [int(x) for x in args.n.split(",")]:
            root = base / f"n{n}"
            root.mkdir(parents=True, exist_ok=False)
            name = f"pop{n}"
            built = build_store(root, name, n, cfg0, m0)
            storage = str(root)
            uri = f"sqlite:///{root / 'mlflow.db'}"
            df = load_results(name, storage)
            print(f"N={n}: {len(df)} models, {df.shape[1]} columns; store built in {built:.0f} s")
            n = len(df)  # the grid rounds N down to whole seeds (100 -> 96)
            t_sql = best(lambda: schema.sqlite_runs(uri, name), args.repeats)  # noqa: B023
            t_client = best(lambda: schema.mlflow_runs(uri, name), args.repeats)  # noqa: B023
            t_load = best(lambda: load_results(name, storage), args.repeats)  # noqa: B023

            def detect_cold():  # the resample draws are cached per population size: time them too
                roc.bootstrap_counts.cache_clear()
                detect_sweep(name, storage, n_boot=1000)  # noqa: B023

            t_detect = best(detect_cold, args.repeats)
            t_front = best(lambda: sweep_frontier(name, storage), args.repeats)  # noqa: B023
            target_detect = 1.0 if n <= 100 else 5.0
            rows += [
                (
                    f"N={n} read: MLflow client / direct SQLite",
                    t_client / t_sql,
                    "",
                    f"{t_client:.2f} s / {t_sql:.3f} s",
                ),
                (f"N={n} load_results, s", t_load, "", ""),
                (f"N={n} detect (1,000 resamples), s", t_detect, f"<= {target_detect:g}", ""),
                (f"N={n} frontier, s", t_front, "<= 1" if n >= 1000 else "", ""),
            ]
            if n <= 100:
                out = base / f"report{n}"
                t_report = best(lambda: write_report(name, out, storage, overwrite=True), 1)  # noqa: B023
                rows.append((f"N={n} report (figures, MLflow upload), s", t_report, "<= 10", ""))
    w = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(w)}  {'value':>8}  {'target':>7}  detail")
    for measure, value, target, detail in rows:
        print(f"{measure.ljust(w)}  {value:8.3f}  {target:>7}  {detail}")


if __name__ == "__main__":
    main()
