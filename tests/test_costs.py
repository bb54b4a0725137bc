"""``sweeper plan`` estimates from the store's finished trials where it has them, and says so."""

from __future__ import annotations

from sweeper.cli import main
from sweeper.costs import Measured, estimate, estimate_parts, measured_costs, store_uri
from trainables import TrialConfig


def test_plan_is_calibrated_by_the_finished_trials_of_the_same_model_and_dataset(grid_sweep, capsys):
    storage, _ = grid_sweep  # digits, cnn, kappa 0 and 50 (and a diverged 1e8), 1 epoch
    uri = store_uri(str(storage), None)
    measured = measured_costs(uri)
    assert measured.n_trials >= 4
    cfg = TrialConfig(epochs=10, kappa=0.0)
    seconds, source = estimate(cfg, measured)
    assert source.startswith("measured (train") and "spectrum" in source, source
    per_epoch = sorted(measured.train[("cnn", "digits", False)])
    assert per_epoch  # a measured per-image epoch cost, scaled to 10 epochs of 1437 images
    assert seconds >= per_epoch[0] * 10 * 1437
    code = main(["plan", "--epochs", "10", "--kappa", "0,50", "--theta", "0.1", "--storage", str(storage)])
    out = capsys.readouterr().out
    assert code == 0 and "measured (train" in out and "2 of 2 trials measured on" in out, out
    # another dataset: the store knows nothing of it, the rough model answers and says so
    code = main(["plan", "--epochs", "1", "--set", "model=linear", "--storage", str(storage)])
    out = capsys.readouterr().out
    assert code == 0 and " model\n" in out and "rough model" in out, out


def test_without_a_store_plan_uses_the_rough_model(tmp_path):
    assert store_uri(str(tmp_path), None) is None
    cfg = TrialConfig(kappa=100.0)
    seconds, source = estimate(cfg, Measured())
    assert source == "model" and seconds == sum(estimate_parts(cfg).values())


def test_a_penalised_estimate_scales_an_unpenalised_measurement():
    m = Measured()
    m.add({"model": "cnn", "dataset": "digits", "epochs": "2", "kappa": "0"}, {"train_seconds": 2.874}, 1437)
    unpenalised, _ = estimate(TrialConfig(epochs=2, kappa=0.0, hessian=False, detect_baselines=""), m)
    penalised, source = estimate(TrialConfig(epochs=2, kappa=10.0, hessian=False, detect_baselines=""), m)
    assert abs(unpenalised - 2.874 - estimate_parts(TrialConfig(hessian=False, detect_baselines=""))["detect"]) < 1e-9
    assert source == "measured (train 1 trials)"
    assert abs((penalised - unpenalised) - 2.874 * 1.8) < 1e-6  # x2.8 on the training part only
