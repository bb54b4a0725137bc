"""The Optuna samplers of ``sweeper search`` (:func:`make_sampler`; the benchmark builds the same) and the
searcher Ray Tune drives."""

from __future__ import annotations

from trainables.config import SweeperError
from trainables.record import SweepMeta

SAMPLERS = ("nsga2", "tpe", "gp", "random")


def make_sampler(name: str, seed: int, budget: int):
    """The Optuna sampler ``sweeper search --sampler NAME`` uses (the benchmark builds the same)."""
    import optuna

    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, budget // 3))
    # TPE and GP keep Optuna's 10 random start-up trials: with 3 (tried) both did worse than random
    # search on benchmarks/search_vs_grid.py; below 11 trials they *are* random search (same points)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise SweeperError(f"--sampler {name!r} is invalid: must be one of {', '.join(SAMPLERS)}")


def searcher(meta: SweepMeta):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from trainables.record import stored_objectives

    s = meta.search
    objectives = stored_objectives(s)
    from . import logs

    logs.route()  # Optuna's import gave its logger a stderr handler ("A new study created ...")
    storage = optuna.storages.RDBStorage(s["optuna_storage"])
    return OptunaSearch(
        metric=[o.metric for o in objectives],
        mode=[o.direction for o in objectives],
        sampler=make_sampler(s["sampler"], s["seed"], s["budget"]),
        study_name=meta.name,
        storage=storage,
    )
