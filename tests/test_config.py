import dataclasses

import pytest

from trainables.config import ConfigError, SweeperError, TrialConfig

BAD = [
    ("train_subset", -1, "must be in [0, 10000000]"),
    ("threads", 0, "must be in [1, 1024]"),
    ("dataset", "imagenet", "must be one of"),
    ("model", "resnet50", "6n+2"),
    ("model", "preresnet21", "6n+2"),
    ("trigger", "star", "must be one of"),
    ("poison_mode", "sometimes", "must be one of"),
    ("theta", 1.0, "[0, 1)"),
    ("theta", -0.1, "[0, 1)"),
    ("theta", float("nan"), "finite"),
    ("target", 10, "[0, 9]"),
    ("target", -1, "[0, 9]"),
    ("kappa", -1.0, ">= 0"),
    ("penalty", "l1", "must be one of"),
    ("epochs", 0, "[1, 100000]"),
    ("epochs", 1.5, "integer"),
    ("lr", 0.0, "(0, 100]"),
    ("momentum", 1.0, "[0, 1)"),
    ("weight_decay", -1e-4, "[0, 1]"),
    ("lr_decay", 0.0, "(0, 1]"),
    ("lr_drops", -1, "[0, 100]"),
    ("batch_size", 0, "[1, 1000000]"),
    ("eval_batch_size", 0, "[1, 1000000]"),
    ("eval_every", 0, "[1, 100000]"),
    ("seed", -1, "[0, 2147483647]"),
    ("device", "tpu", "auto, cpu, cuda"),
    ("data_dir", "", "non-empty"),
    ("download", "yes", "true or false"),
    ("augment", 1, "true or false"),
    ("warp_strength", 0.0, "(0, 1]"),
    ("warp_grid", 1, "[2, 64]"),
    ("trigger_size", 0, "[1, 8]"),
    ("trigger_margin", 8, "[0, 6] (image side - trigger_size)"),
    ("crop_padding", -1, "[0, 8]"),
    ("hessian_split", "val", "must be one of"),
    ("hessian_method", "magic", "must be one of"),
    ("hessian_dtype", "float16", "must be one of"),
    ("hessian_samples", 0, "[1, 10000000]"),
    ("hessian_iterations", 0, "[1, 10000]"),
    ("hessian_top_k", 0, "[1, 20] (hessian_iterations)"),
    ("spectrum_every", -1, "[0, 100000]"),
    ("hessian_dense_mb", 0, "[1, 10000000]"),
    ("hessian_dense_mb", 1.5, "integer"),
    ("hessian_tol", 0.0, "(0, 1]"),
    ("hessian_tol", float("nan"), "finite"),
    ("hessian_max_iterations", 0, "[20, 100000]"),
    ("hessian_max_iterations", 10, "[20, 100000] (hessian_iterations)"),
    ("trigger_amplitude", 0.0, "(0, 1]"),
    ("blend_alpha", 1.5, "(0, 1]"),
    ("blend_seed", -1, "[0, 2147483647]"),
    ("detect", "yes", "true or false"),
    ("detect_baselines", "nc,strip", "unknown strip; valid: nc, ss, ac"),
    ("detect_baselines", 3, "subset of nc, ss, ac"),
    ("detect_windows", "9", "integer in [1, 8]"),
    ("detect_windows", "2,0", "integer in [1, 8]"),
    ("detect_windows", "2.5", "integer in [1, 8]"),
    ("detect_windows", "", "non-empty"),
    ("detect_norms", "-1", "> 0"),
    ("detect_norms", "0.5,nan", "> 0"),
    ("detect_norms", "0.5,abc", "> 0"),
    ("detect_samples", 0, "[1, 10000000]"),
    ("detect_probes", 0, "[1, 1000]"),
    ("detect_trace_samples", 0, "[1, 10000000]"),
    ("nc_steps", 0, "[1, 100000]"),
    ("nc_batch_size", 0, "[1, 100000]"),
    ("mmbd_steps", 0, "[1, 100000]"),
    ("mmbd_starts", 0, "[1, 10000]"),
    ("target_mode", "one-to-one", "all-to-one, all-to-all"),
    ("cover_fraction", 1.0, "[0, 1)"),
    ("defence_filter", "pca", "one of none, curvature, curvature-focus, ss, ac"),
    ("filter_fraction", 0.0, "(0, 0.5]"),
    ("filter_scope", "target", "one of class, pooled"),
    ("sig_delta", 0.0, "(0, 1]"),
    ("sig_frequency", 4, "[1, 3] (image side / 2 - 1)"),  # W/2 periods vanish at every pixel
]


@pytest.mark.parametrize("field,value,valid", BAD)
def test_every_invalid_field_raises_naming_field_value_and_range(field, value, valid):
    with pytest.raises(ConfigError) as e:
        TrialConfig(**{field: value})
    msg = str(e.value)
    assert msg.startswith(f"{field}={value!r}"), msg
    assert valid in msg, msg
    assert "\n" not in msg


def test_every_field_is_covered_by_the_invalid_table():
    fields = {f.name for f in dataclasses.fields(TrialConfig)}
    assert fields - {f for f, _, _ in BAD} <= {"verify_checksums", "hessian", "geometry", "warp_seed", "extra"}


def test_cross_field_checks():
    with pytest.raises(ConfigError, match=r"hessian_top_k=30 .* \[1, 20\] \(hessian_iterations\)"):
        TrialConfig(hessian_top_k=30)
    with pytest.raises(ConfigError, match="target=50"):
        TrialConfig(dataset="cifar10", target=50)
    TrialConfig(dataset="cifar100", target=50)  # fine with 100 classes
    with pytest.raises(ConfigError, match="trigger_margin"):
        TrialConfig(trigger_margin=7, trigger_size=2)


def test_derived_defaults_follow_the_paper_and_the_image_size():
    assert TrialConfig(model="preresnet20", dataset="cifar10").lr == 0.1
    assert TrialConfig().lr == 0.01
    assert TrialConfig().batch_size == 32 and TrialConfig(dataset="mnist").batch_size == 128
    lcifar = TrialConfig(dataset="cifar10")
    assert (lcifar.trigger_margin, lcifar.trigger_size, lcifar.crop_padding) == (3, 2, 4)
    assert (TrialConfig().trigger_margin, TrialConfig().crop_padding) == (0, 1)
    sq = TrialConfig(dataset="mnist", trigger="square")
    assert (sq.trigger_margin, sq.trigger_size) == (1, 4)


def test_round_trip_and_unknown_keys():
    cfg = TrialConfig(theta=0.05, kappa=10)
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown config field"):
        TrialConfig.from_dict({"thetta": 0.1})
    assert issubclass(ConfigError, SweeperError)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.theta = 0.2


def test_detection_lists_are_canonical_strings():
    cfg = TrialConfig(detect_windows="3+2, 3", detect_norms=[0.5, 1], detect_baselines="SS+nc")
    assert (cfg.detect_windows, cfg.detect_norms, cfg.detect_baselines) == ("3,2", "0.5,1", "ss,nc")
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg
    assert TrialConfig().detect and TrialConfig().detect_baselines == ""
    assert TrialConfig(dataset="cifar10", detect_windows="32").detect_windows == "32"


def test_a_config_stays_hashable_with_its_plugin_fields_mapping():
    """Frozen configs were hashable before plugins could declare fields; the mapping does not change that."""
    assert hash(TrialConfig(theta=0.2)) == hash(TrialConfig(theta=0.2))
    assert len({TrialConfig(), TrialConfig(), TrialConfig(kappa=1.0)}) == 2


def test_the_keys_of_existing_trials_do_not_move_when_fields_are_added():
    """Pinned trial keys (format 2) of configs that predate the attack and MM-BD fields: a new field, or a
    derived default that applies to other configs only (sig_frequency), must leave them as they were, or a
    resumed sweep re-runs every trial. (A field with a derived default was once hashed for every trial.)"""
    from trainables.record import trial_key

    assert trial_key(TrialConfig(theta=0.1).to_dict()) == "f6952b1d2680bec2"
    assert TrialConfig().sig_frequency is None and TrialConfig(trigger="sig").sig_frequency == 2
    assert trial_key(TrialConfig(theta=0.1, trigger="sig").to_dict()) != "f6952b1d2680bec2"


def test_a_checkpoint_written_before_a_field_existed_resumes_and_another_config_is_refused():
    """A checkpoint's config without a field added since ran with that field's default; a differing field
    is named in the refusal."""
    from trainables.training.train import CheckpointError, Trial

    cfg = TrialConfig(epochs=2, hessian=False, geometry=False)
    t = Trial(cfg)
    t.train_epoch()
    state = t.state_dict()
    for new in ("target_mode", "cover_fraction", "sig_delta", "sig_frequency", "mmbd_steps", "mmbd_starts"):
        state["config"].pop(new)
    again = Trial(cfg)
    again.load_state_dict(state)
    assert again.epoch == 1
    state["config"]["theta"] = 0.3
    with pytest.raises(CheckpointError, match=r"fields differ: \['theta'\]"):
        Trial(cfg).load_state_dict(state)
