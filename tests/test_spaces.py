import pytest

from sweeper.spaces import SpaceError, SweepSpec, estimate_seconds, load_sweep_file, parse_seeds, parse_values


def test_lists_ranges_and_log_ranges():
    assert parse_values("theta", "0,0.01,0.02") == [0.0, 0.01, 0.02]
    assert parse_values("theta", "0.001:0.005:0.001") == [0.001, 0.002, 0.003, 0.004, 0.005]
    assert parse_values("kappa", "log:1e2:1e5:4") == [100.0, 1000.0, 10000.0, 100000.0]
    assert parse_values("augment", "both") == [False, True]
    assert parse_values("augment", "on") == [True]
    assert parse_values("epochs", "90,450") == [90, 450]
    assert parse_values("epochs", "1:3:1") == [1, 2, 3]
    assert parse_values("trigger", "lshape,warp") == ["lshape", "warp"]
    assert parse_values("theta", "0.1,0.1") == [0.1]  # repeats dropped


@pytest.mark.parametrize("name,text,needle", [
    ("theta", "a,b", "--theta='a' is invalid: expected a number"),
    ("epochs", "1.5", "expected an integer"),
    ("kappa", "log:0:10:3", "START, STOP > 0"),
    ("kappa", "log:1:10", "log:START:STOP:COUNT"),
    ("theta", "0.1:0:0.01", "STOP >= START"),
    ("theta", "0:1:0", "STEP > 0"),
    ("augment", "maybe", "on, off or both"),
    ("thetaa", "0.1", "not a network-trial field"),
])
def test_bad_values_name_flag_value_and_syntax(name, text, needle):
    with pytest.raises(SpaceError) as e:
        parse_values(name, text)
    assert needle in str(e.value)


def test_grid_is_built_and_validated_before_anything_runs():
    spec = SweepSpec(axes={"theta": [0.0, 0.1], "kappa": [0.0, 10.0]}, fixed={"epochs": 2}, seeds=[0, 1])
    cfgs = spec.configs()
    assert spec.size == 8 and len(cfgs) == 8
    assert {(c.theta, c.kappa, c.seed) for c in cfgs} == {(t, k, s) for t in (0.0, 0.1) for k in (0.0, 10.0) for s in (0, 1)}
    assert all(c.epochs == 2 and c.data_dir.startswith("/") for c in cfgs)
    bad = SweepSpec(axes={"theta": [0.1, 1.5]})
    with pytest.raises(SpaceError, match=r"theta=1.5 is invalid.*grid point \{'theta': 1.5\}"):
        bad.configs()
    with pytest.raises(SpaceError, match="both as an axis and as a fixed"):
        SweepSpec(axes={"theta": [0.1]}, fixed={"theta": 0.2})


def test_sweep_file(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("name: paper-fig6\ngrid:\n  theta: '0.001:0.003:0.001'\n  kappa: [0, 1000]\n"
                 "  augment: both\nfixed:\n  epochs: 3\n  dataset: digits\nseeds: 2\n")
    spec, name = load_sweep_file(f)
    assert name == "paper-fig6" and spec.size == 3 * 2 * 2 * 2
    assert spec.fixed == {"epochs": 3, "dataset": "digits"} and spec.seeds == [0, 1]
    f.write_text("grid:\n  theta: [0.1]\nextra: 1\n")
    with pytest.raises(SpaceError, match=r"unknown key\(s\) \['extra'\]"):
        load_sweep_file(f)
    f.write_text("fixed:\n  epoch: 3\n")
    with pytest.raises(SpaceError, match="fixed field 'epoch' is not a trial field"):
        load_sweep_file(f)
    f.write_text("grid: [1, 2\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_sweep_file(f)


def test_seeds_and_cost():
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("5,7") == [5, 7]
    with pytest.raises(SpaceError, match="must be >= 1"):
        parse_seeds(0)
    spec = SweepSpec(axes={"kappa": [0.0, 100.0]}, fixed={"epochs": 15})
    a, b = (estimate_seconds(c) for c in spec.configs())
    assert 0 < a < b  # the penalty costs extra


def test_one_merge_order_everywhere_defaults_file_flags_set(tmp_path):
    from sweeper.spaces import build_search_spec, build_spec, trial_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.02\nkappa: 5\nepochs: 3\n")
    # trial: the file beats the defaults, a flag beats the file, --set beats the flag
    cfg = trial_config("network", cfg_file, {"kappa": 7.0}, ["lr=0.05", "kappa=9"])
    assert (cfg.lr, cfg.kappa, cfg.epochs) == (0.05, 9.0, 3)
    assert trial_config("network", cfg_file, {"lr": 0.03}, None).lr == 0.03
    # run / plan: the sweep file, then flags, then --set
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\ngrid: {kappa: [0, 1]}\nfixed: {epochs: 4, lr: 0.02}\n")
    spec, name = build_spec(sweep, {"kappa": "2,3"}, None, ["kappa=5,6,7", "lr=0.04"])
    assert name == "s" and spec.axes["kappa"] == [5.0, 6.0, 7.0] and spec.fixed["lr"] == 0.04 and spec.fixed["epochs"] == 4
    # search: the defaults, then flags, then --set
    search = build_search_spec({"kappa": "log:10:100"}, ["kappa=3"])
    assert search.fixed["kappa"] == 3.0 and "kappa" not in search.continuous


def test_plan_cost_includes_detection_and_its_baselines():
    from trainables.config import TrialConfig

    plain = estimate_seconds(TrialConfig(detect=False))
    detect = estimate_seconds(TrialConfig())
    nc = estimate_seconds(TrialConfig(detect_baselines="nc"))
    everything = estimate_seconds(TrialConfig(detect_baselines="nc,ss,ac"))
    assert plain < detect < nc < everything
    assert nc > 3 * detect  # Neural Cleanse's 300 Adam steps over every class dominate a digits trial


def test_every_published_sweep_file_validates():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        spec, name = load_sweep_file(path)
        assert name == path.stem and spec.configs(), path  # every trial's TrialConfig is valid
