"""Does a defence search find the grid's frontier with fewer trials?

On digits, against one fixed threat (lshape trigger, theta = 0.05, deterministic poisoning), the
defence space is kappa (log-uniform on [1, 1000]) x augmentation (on / off). The grid evaluates 12
log-spaced kappas x both augmentation settings (24 models). Each sampler of ``sweeper search``
(NSGA-II, multivariate TPE, GP, random: built by :func:`sweeper.samplers.make_sampler`, the
same objects the CLI uses) runs 3 seeded studies of 12 defences, one after another (ask, train,
tell: batch size 1); budgets of 1/6, 1/4, 1/3 and 1/2 of the grid are read as the first 4, 6, 8 and
12 trials of each study (the samplers' behaviour does not depend on the budget at these sizes:
NSGA-II's population is max(4, budget // 3) = 4 for every budget <= 14; TPE and GP draw Optuna's
10 random start-up trials whatever the budget).

Score: the hypervolume of a study's (clean_acc, asr) points as a fraction of the grid's, with the
reference point clean_acc = 0, asr = 1 (the worst possible model). Every model is trained exactly
as a `sweeper search` model (TrialConfig, 10 epochs, no spectrum), one torch thread, two processes.

    python benchmarks/search_vs_grid.py [--epochs 10] [--studies 3] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLERS = ("nsga2", "tpe", "gp", "random")
GRID_KAPPAS = np.geomspace(1.0, 1000.0, 12)
KAPPA = (1.0, 1000.0)
BUDGET_FRACTIONS = ((1, 6), (1, 4), (1, 3), (1, 2))
REFERENCE = (0.0, 1.0)  # clean_acc, asr
OBJECTIVES = (("clean_acc", "max"), ("asr", "min"))
THREAT = {"theta": 0.05, "trigger": "lshape", "poison_mode": "deterministic"}


def evaluate(kappa: float, augment: bool, epochs: int) -> tuple[float, float]:
    """(clean_acc, asr) of one digits model trained with this defence against the threat."""
    import torch

    from trainables.config import TrialConfig
    from trainables.training.train import Trial

    torch.set_num_threads(1)
    trial = Trial(
        TrialConfig(
            **THREAT,
            kappa=float(kappa),
            augment=bool(augment),
            epochs=epochs,
            hessian=False,
            geometry=False,
            detect=False,
            threads=1,
        )
    )
    while not trial.done:
        trial.train_epoch()
    result = trial.result()
    return float(result.metrics["clean_acc"]), float(result.metrics["asr"])


def _grid_point(args):
    kappa, augment, epochs = args
    return {
        "kappa": kappa,
        "augment": augment,
        **dict(zip(("clean_acc", "asr"), evaluate(kappa, augment, epochs), strict=True)),
    }


def _study(args):
    """One seeded study of ``n`` defences: ask, train, tell (as OptunaSearch does, one at a time)."""
    sampler_name, seed, n, epochs = args
    import optuna

    from sweeper.samplers import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(sampler_name, seed, n))
    dists = {
        "kappa": optuna.distributions.FloatDistribution(*KAPPA, log=True),
        "augment": optuna.distributions.CategoricalDistribution([False, True]),
    }
    rows = []
    for i in range(n):
        trial = study.ask(dists)
        clean, asr = evaluate(trial.params["kappa"], trial.params["augment"], epochs)
        study.tell(trial, [clean, asr])
        rows.append({"sampler": sampler_name, "seed": seed, "trial": i, **trial.params, "clean_acc": clean, "asr": asr})
    return rows


def main() -> None:
    from analysis.pareto import hypervolume

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--studies", type=int, default=3, help="sampler seeds per sampler")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--csv", type=Path, default=None, help="write every evaluated point here (refuses to overwrite)")
    a = p.parse_args()
    if a.csv is not None and a.csv.exists():
        sys.exit(f"--csv {a.csv} already exists; refusing to overwrite it")
    grid_n = len(GRID_KAPPAS) * 2
    n = max(grid_n * num // den for num, den in BUDGET_FRACTIONS)
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(a.processes) as pool:
        grid_async = pool.map_async(_grid_point, [(k, aug, a.epochs) for aug in (False, True) for k in GRID_KAPPAS])
        studies = pool.map(_study, [(s, seed, n, a.epochs) for s in SAMPLERS for seed in range(a.studies)])
        grid = pd.DataFrame(grid_async.get())
    seconds = time.perf_counter() - t0
    points = pd.DataFrame([r for rows in studies for r in rows])
    dirs = [d for _, d in OBJECTIVES]
    cols = [m for m, _ in OBJECTIVES]
    grid_hv = hypervolume(grid[cols].to_numpy(), dirs, REFERENCE)
    table = []
    for s in SAMPLERS:
        for num, den in BUDGET_FRACTIONS:
            budget = grid_n * num // den
            fr = [
                hypervolume(g[g["trial"] < budget][cols].to_numpy(), dirs, REFERENCE) / grid_hv
                for _, g in points[points["sampler"] == s].groupby("seed")
            ]
            table.append(
                {
                    "sampler": s,
                    "budget": f"{num}/{den} ({budget})",
                    "hv_fraction_mean": np.mean(fr),
                    "hv_fraction_min": np.min(fr),
                    "hv_fraction_max": np.max(fr),
                }
            )
    table = pd.DataFrame(table)
    print(
        f"threat: {THREAT}; defence: kappa log-uniform {KAPPA} x augment; {a.epochs} epochs; "
        f"reference point clean_acc={REFERENCE[0]}, asr={REFERENCE[1]}"
    )
    print(f"grid: {grid_n} models, hypervolume {grid_hv:.4f}; frontier:")
    from analysis.pareto import frontier

    print(
        frontier(grid.assign(status="completed"), OBJECTIVES).to_string(index=False, float_format=lambda v: f"{v:.4g}")
    )
    print(
        f"\nhypervolume as a fraction of the grid's ({a.studies} sampler seeds each; {len(points) + grid_n} models "
        f"in {seconds:.0f} s on {a.processes} processes):"
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    third = table[table["budget"].str.startswith("1/3")].sort_values("hv_fraction_mean", ascending=False)
    best = third.iloc[0]
    print(
        f"\nbest at 1/3 of the grid: {best['sampler']} (mean {best['hv_fraction_mean']:.3f}, worst seed "
        f"{best['hv_fraction_min']:.3f}); target >= 0.95: {'met' if best['hv_fraction_mean'] >= 0.95 else 'NOT met'}"
    )
    if a.csv is not None:
        pd.concat([grid.assign(sampler="grid"), points]).to_csv(a.csv, index=False)


if __name__ == "__main__":
    main()
