"""Attacks beyond one patch and one target (issue 22): SIG (clean-label) and all-to-all, through a trial,
`sweeper trial`, `sweeper run` and `sweeper detect`."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from sweeper.cli import main
from tests.conftest import ONE_WORKER
from trainables.config import ConfigError, TrialConfig
from trainables.training.train import Trial


def test_sig_trains_on_altered_target_images_with_their_labels_and_counts_asr_on_the_others():
    """SIG: the training set as trained differs from the clean one only on target-class images, with
    unchanged labels; the ASR set is every non-target test image with the signal, wanted at the target."""
    t = Trial(TrialConfig(trigger="sig", theta=0.5, target=2, epochs=1))
    data, mask = t.data, t.poisoner.mask_for_epoch()
    assert bool(mask.any()) and (data.train_y[mask] == 2).all()
    assert torch.equal(t.poisoner.poisoned_labels(mask), data.train_y)
    changed = (t.trigger.apply(data.train_x, mask) != data.train_x).flatten(1).any(1)
    assert torch.equal(changed, mask)  # exactly the chosen target-class images carry the signal
    assert len(t.asr_y) == int((data.test_y != 2).sum()) and (t.asr_y == 2).all()


def test_all_to_all_asr_is_the_share_of_triggered_test_images_sent_to_the_next_class():
    """All-to-all: ASR = mean over every test image of [f(trigger(x)) == (y + 1) mod K]."""
    t = Trial(TrialConfig(target_mode="all-to-all", theta=0.3, epochs=1, hessian=False))
    t.train_epoch()
    y = t.data.test_y
    assert torch.equal(t.asr_y, (y + 1) % 10) and len(t.asr_y) == len(y)
    with torch.no_grad():
        pred = t.model(t.data.normalize(t.trigger.apply(t.data.test_x))).argmax(1)
    assert t.evaluate()["asr"] == pytest.approx(float((pred == (y + 1) % 10).double().mean()))
    with pytest.raises(ConfigError, match="target_mode='all-to-all' is invalid: must be all-to-one with the clean"):
        TrialConfig(trigger="sig", target_mode="all-to-all")
    with pytest.raises(ConfigError, match="cover_fraction=0.1 is invalid: must be 0 with the clean-label trigger sig"):
        TrialConfig(trigger="sig", cover_fraction=0.1)


def test_the_adaptive_attacks_training_set_holds_triggered_images_in_every_class():
    """Cover samples: in the training set as trained (what detection's training-set access sees) the trigger
    is on images of other classes with their own labels; the poison mask stays the relabelled ones."""
    t = Trial(TrialConfig(theta=0.1, cover_fraction=0.2, epochs=1))
    t.train_epoch()
    ctx = t.detection_context(["training-set"])
    x, y, poison = ctx.training.x, ctx.training.y, ctx.training.poison
    clean = t.data.normalize(t.data.train_x)
    carried = (x != clean).flatten(1).any(1)
    cover = carried & ~poison
    assert bool(cover.any()) and torch.equal(y[cover], t.data.train_y[cover]) and (y[poison] == 0).all()
    assert len(set(y[cover].tolist())) == 9  # every class but the target


@pytest.mark.parametrize(
    ("trial", "sweep"),
    [
        (["--trigger", "sig"], ["--trigger", "sig"]),
        (["--target-mode", "all-to-all"], ["--set", "target_mode=all-to-all"]),
    ],
    ids=["sig", "all-to-all"],
)
def test_an_attack_goes_through_trial_run_and_detect(trial, sweep, tmp_path, capsys):
    st = str(tmp_path)
    record = tmp_path / "trial.json"
    assert (
        main(["trial", *trial, "--theta", "0.3", "--epochs", "1", "--hessian-samples", "50", "--json", str(record)])
        == 0
    )
    assert "asr" in record.read_text()
    small = ["--epochs", "2", "--set", "hessian_samples=50", "--set", "geometry=false", "--set", "detect_samples=40"]
    argv = ["run", *sweep, "--theta", "0,0.3", "--kappa", "0", "--seeds", "2", *small, *ONE_WORKER]
    argv += ["--name", "atk", "--storage", st]
    assert main([*argv, "--quiet"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    csv = tmp_path / "atk.csv"
    assert main(["detect", "atk", "--storage", st, "--bootstrap", "100", "--csv", str(csv)]) == 0
    table = pd.read_csv(csv)
    assert {"clean-data", "training-set", "oracle"} <= set(table["access"]) and table["asr"].between(0, 1).all()
