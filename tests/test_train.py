import math

import pytest
import torch

from trainables.config import TrialConfig
from trainables.data.images import load_digits
from trainables.training.train import CheckpointError, Trial, run_trial

DIGITS = load_digits()


def small(**kw):
    base = dict(epochs=3, hessian=False, geometry=False)
    base.update(kw)
    return TrialConfig(**base)


def strip(history):
    return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in history]


def test_same_seed_same_metrics():
    cfg = small(epochs=2, augment=True, kappa=10.0)
    a = run_trial(cfg, data=DIGITS)
    b = run_trial(cfg, data=DIGITS)
    assert strip(a.history) == strip(b.history)


@pytest.mark.parametrize("mode", ["stochastic", "deterministic"])
def test_checkpoint_resume_gives_the_uninterrupted_metrics(tmp_path, mode):
    cfg = small(epochs=4, augment=True, kappa=10.0, poison_mode=mode)
    full = run_trial(cfg, data=DIGITS)
    ck = tmp_path / "trial.pt"
    part = run_trial(cfg, checkpoint=ck, data=DIGITS, max_epochs=2)
    assert part.status == "running" and len(part.history) == 2
    torch.manual_seed(1234)  # disturb global RNG state: the checkpoint must restore it
    resumed = run_trial(cfg, checkpoint=ck, data=DIGITS)
    assert strip(resumed.history) == strip(full.history)
    assert resumed.metrics["clean_acc"] == full.metrics["clean_acc"]


def test_checkpoint_of_another_config_is_refused(tmp_path):
    ck = tmp_path / "trial.pt"
    run_trial(small(epochs=1), checkpoint=ck, data=DIGITS)
    with pytest.raises(CheckpointError, match=r"another config \(fields differ: \['theta'\]\)"):
        run_trial(small(epochs=1, theta=0.2), checkpoint=ck, data=DIGITS)
    ck.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        run_trial(small(epochs=1), checkpoint=ck, data=DIGITS)


def test_divergence_is_reported_not_raised():
    res = run_trial(small(epochs=3, lr=50.0, momentum=0.9, kappa=1e6), data=DIGITS)
    assert res.status == "diverged"
    assert res.diverged_epoch == 1 and len(res.history) == 1
    assert math.isnan(res.metrics["train_loss"])


def test_asr_never_counts_target_class_images():
    trial = Trial(small(target=3), data=DIGITS)
    assert len(trial.asr_x) == int((DIGITS.test_y != 3).sum())

    class Always(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x):
            out = torch.zeros(len(x), 10)
            out[:, self.c] = 1.0
            return out + 0.0 * x.flatten(1)[:, :1]  # depends on x so input gradients exist

    trial.model = Always(3)
    assert trial.evaluate()["asr"] == 1.0
    trial.model = Always(4)
    assert trial.evaluate()["asr"] == 0.0


def test_poisoning_counts_and_train_accuracy_are_reported():
    res = run_trial(small(epochs=1, theta=0.2, poison_mode="deterministic"), data=DIGITS)
    eligible = int((DIGITS.train_y != 0).sum())
    assert abs(res.metrics["n_poisoned"] - 0.2 * eligible) < 4 * (0.16 * eligible) ** 0.5
    for key in ("clean_acc", "asr", "train_acc", "train_loss", "penalty", "fisher_trace", "lr"):
        assert key in res.metrics


EVALUATED = ("clean_acc", "asr", "train_acc", "fisher_trace")


def test_eval_every_skips_evaluations_between_and_changes_nothing_else():
    """eval_every=2 over 3 epochs evaluates epochs 2 and 3 (the last always); the training and the final
    metrics are those of evaluating every epoch (evaluation draws no random numbers)."""
    every = run_trial(small(epochs=3, augment=True), data=DIGITS)
    sparse = run_trial(small(epochs=3, augment=True, eval_every=2), data=DIGITS)
    assert [all(k in h for k in EVALUATED) for h in sparse.history] == [False, True, True]
    assert not any(k in sparse.history[0] for k in EVALUATED)
    for dense, thin in zip(every.history, sparse.history, strict=True):
        assert {k: v for k, v in strip([thin])[0].items()} == {k: v for k, v in strip([dense])[0].items() if k in thin}
    assert sparse.metrics["clean_acc"] == every.metrics["clean_acc"] and sparse.metrics["asr"] == every.metrics["asr"]


def test_eval_every_still_evaluates_the_end_of_each_training_of_a_filter():
    cfg = small(epochs=2, theta=0.1, defence_filter="ss", eval_every=5)
    result = run_trial(cfg, data=DIGITS)
    assert [h["epoch"] for h in result.history if "clean_acc" in h] == [2, 4]  # the end of each training
    assert {"pre_filter_clean_acc", "pre_filter_asr", "clean_acc", "asr"} <= set(result.metrics)
