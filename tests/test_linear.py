import numpy as np
import pytest

from trainables.config import ConfigError
from trainables.exact_models.linear import LinearConfig, qr_add_feature, run_linear_trial


def test_lemma_f1_equals_a_full_least_squares_refit():
    rng = np.random.default_rng(0)
    x = np.hstack([rng.normal(size=(300, 12)), np.ones((300, 1))])
    y = rng.normal(size=(300, 4))
    x_new = (rng.random(300) < 0.1).astype(float)
    step = qr_add_feature(x, y, x_new)
    full, *_ = np.linalg.lstsq(np.hstack([x, x_new[:, None]]), y, rcond=None)
    beta_step = np.vstack([step["beta_old"], step["beta_new"][None]])
    assert np.linalg.norm(beta_step - full) / np.linalg.norm(full) < 1e-8
    rss = lambda xx, b: ((y - xx @ b) ** 2).sum(0)  # noqa: E731
    np.testing.assert_allclose(
        step["rss_drop"], rss(x, step["beta"]) - rss(np.hstack([x, x_new[:, None]]), full), rtol=1e-8
    )


def test_linear_trial_on_digits():
    met = run_linear_trial(LinearConfig(theta=0.1)).metrics
    assert met["step_rel_err"] < 1e-8
    assert met["rss_drop"] == pytest.approx(met["rss_drop_measured"], rel=1e-8)
    assert met["clean_acc"] > 0.85 and met["asr"] > 0.9
    assert met["trigger_cosine"] > 0.1  # the target's weight change leans towards the trigger
    clean = run_linear_trial(LinearConfig(theta=0.0)).metrics
    assert clean["asr"] < 0.1 and clean["step_rel_err"] < 1e-8  # no poisoned sample: the update is zero


def test_linear_config_validation():
    with pytest.raises(ConfigError, match="theta=1.0"):
        LinearConfig(theta=1.0)
    with pytest.raises(ConfigError, match="dataset='cifar10'"):
        LinearConfig(dataset="cifar10")
    with pytest.raises(ConfigError, match="unknown linear-trial field"):
        LinearConfig.from_dict({"epochs": 3})


def test_qr_add_feature_takes_one_response_as_lemma_f1_states_it():
    rng = np.random.default_rng(3)
    x, x_new = rng.normal(size=(40, 5)), rng.normal(size=40)
    y = rng.normal(size=40)
    one = qr_add_feature(x, y, x_new)
    many = qr_add_feature(x, y[:, None], x_new)
    full = np.linalg.lstsq(np.hstack([x, x_new[:, None]]), y, rcond=None)[0]
    assert one["beta"].shape == (5,) and np.ndim(one["beta_new"]) == 0
    np.testing.assert_allclose(one["beta_old"], many["beta_old"][:, 0], rtol=1e-12)
    np.testing.assert_allclose(np.r_[one["beta_old"], one["beta_new"]], full, rtol=1e-8, atol=1e-10)
