"""Pure PyTorch trial code: data, triggers, poisoning, models, penalty, Hessian, training.

Nothing here imports Ray or MLflow; the orchestration layer drives :class:`~trainables.train.Trial`.
"""

from .config import ConfigError, TrialConfig
from .train import Trial, TrialResult, run_trial

__all__ = ["ConfigError", "Trial", "TrialConfig", "TrialResult", "run_trial"]
