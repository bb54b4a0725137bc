import pytest

from sweeper.costs import estimate_seconds
from sweeper.spaces import SpaceError, SweepSpec, load_sweep_file, parse_seeds, parse_values


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


@pytest.mark.parametrize(
    "name,text,needle",
    [
        ("theta", "a,b", "--theta='a' is invalid: expected a number"),
        ("epochs", "1.5", "expected an integer"),
        ("kappa", "log:0:10:3", "START, STOP > 0"),
        ("kappa", "log:1:10", "log:START:STOP:COUNT"),
        ("theta", "0.1:0:0.01", "STOP >= START"),
        ("theta", "0:1:0", "STEP > 0"),
        ("augment", "maybe", "on, off or both"),
        ("thetaa", "0.1", "not a network-trial field"),
    ],
)
def test_bad_values_name_flag_value_and_syntax(name, text, needle):
    with pytest.raises(SpaceError) as e:
        parse_values(name, text)
    assert needle in str(e.value)


def test_grid_is_built_and_validated_before_anything_runs():
    spec = SweepSpec(axes={"theta": [0.0, 0.1], "kappa": [0.0, 10.0]}, fixed={"epochs": 2}, seeds=[0, 1])
    cfgs = spec.configs()
    assert spec.size == 8 and len(cfgs) == 8
    assert {(c.theta, c.kappa, c.seed) for c in cfgs} == {
        (t, k, s) for t in (0.0, 0.1) for k in (0.0, 10.0) for s in (0, 1)
    }
    assert all(c.epochs == 2 and c.data_dir.startswith("/") for c in cfgs)
    bad = SweepSpec(axes={"theta": [0.1, 1.5]})
    with pytest.raises(SpaceError, match=r"theta=1.5 is invalid.*grid point \{'theta': 1.5\}"):
        bad.configs()
    with pytest.raises(SpaceError, match="both as an axis and as a fixed"):
        SweepSpec(axes={"theta": [0.1]}, fixed={"theta": 0.2})


def test_sweep_file(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(
        "name: paper-fig6\ngrid:\n  theta: '0.001:0.003:0.001'\n  kappa: [0, 1000]\n"
        "  augment: both\nfixed:\n  epochs: 3\n  dataset: digits\nseeds: 2\n"
    )
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
    from sweeper.search_space import build_search_spec
    from sweeper.spaces import build_spec, trial_config

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
    assert (
        name == "s" and spec.axes["kappa"] == [5.0, 6.0, 7.0] and spec.fixed["lr"] == 0.04 and spec.fixed["epochs"] == 4
    )
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


def test_a_list_field_takes_its_list_as_one_value_and_an_axis_over_lists_needs_a_bar():
    """`trial --detect-baselines nc,ss,ac` is one trial with three baselines: `--set` means the same everywhere."""
    from sweeper.search_space import build_search_spec
    from sweeper.spaces import build_spec, is_list_field, parse_sets, trial_config

    assert all(is_list_field(f) for f in ("detect_baselines", "detect_windows", "detect_norms"))
    assert not is_list_field("theta") and not is_list_field("m", "kernel")
    assert parse_values("detect_baselines", "nc,ss,ac") == ["nc,ss,ac"]  # one value, not three
    assert parse_values("detect_baselines", " nc + ss ") == ["nc,ss"]  # `+` still separates items
    assert parse_values("detect_baselines", "") == [""]  # the empty list: no baselines
    assert parse_values("detect_baselines", "nc,ss|ac") == ["nc,ss", "ac"]  # `|`: an axis over lists
    assert parse_values("detect_baselines", "nc+ss|ac|") == ["nc,ss", "ac", ""]
    assert parse_values("detect_norms", "0.5|0.5,1|0.5") == ["0.5", "0.5,1"]  # repeats dropped
    assert parse_values("lr", "0.01,0.1") == [0.01, 0.1]  # a scalar field keeps a,b as an axis
    # trial: --set and the dedicated flag agree
    via_set = trial_config("network", None, None, ["detect_baselines=nc,ss,ac", "detect_norms=0.5,1"])
    via_flag = trial_config("network", None, {"detect_baselines": "nc,ss,ac", "detect_norms": "0.5,1"})
    assert (
        (via_set.detect_baselines, via_set.detect_norms)
        == (via_flag.detect_baselines, via_flag.detect_norms)
        == ("nc,ss,ac", "0.5,1")
    )
    with pytest.raises(SpaceError, match="a single trial takes one value"):
        parse_sets(["detect_baselines=nc|ac"])
    # run / plan: one value is a fixed field, `|` an axis; a scalar's a,b stays an axis
    spec, _ = build_spec(None, {"theta": "0.1", "kappa": "0"}, None, ["detect_baselines=nc,ss,ac", "lr=0.01,0.1"])
    assert spec.fixed["detect_baselines"] == "nc,ss,ac" and spec.axes == {"lr": [0.01, 0.1]}
    assert spec.describe() == "2 trials (lr = 2)"
    spec, _ = build_spec(None, {"theta": "0.1", "kappa": "0"}, "2", ["detect_baselines=nc,ss|ac"])
    assert spec.axes == {"detect_baselines": ["nc,ss", "ac"]}
    assert spec.describe() == "4 trials (detect_baselines x seed = 2 x 2)"
    assert sorted({c.detect_baselines for c in spec.configs()}) == ["ac", "nc,ss"]
    assert SweepSpec(fixed={"theta": 0.1}).describe() == "1 trial"
    # search: one value is fixed, `|` a categorical choice between lists
    assert build_search_spec({}, ["detect_baselines=nc,ss,ac"]).fixed["detect_baselines"] == "nc,ss,ac"
    assert build_search_spec({}, ["detect_baselines=nc|ss,ac"]).categorical["detect_baselines"] == ["nc", "ss,ac"]


def test_sweep_file_grid_list_is_the_axis_fixed_list_is_one_value(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(
        "grid:\n  detect_baselines: [[nc, ss], [ac]]\n  detect_norms: [0.5, 1]\n"
        "  detect_windows: '2,3'\nfixed:\n  theta: 0.1\n  kappa: 0\n  epochs: 1\n"
    )
    spec, _ = load_sweep_file(f)
    # grid: the YAML list is the axis, each element one list; a string follows the flag syntax (one value here)
    assert spec.axes == {"detect_baselines": ["nc,ss", "ac"], "detect_norms": ["0.5", "1"], "detect_windows": ["2,3"]}
    assert spec.size == 4 and {c.detect_windows for c in spec.configs()} == {"2,3"}
    f.write_text("grid:\n  detect_baselines: 'nc,ss|ac'\nfixed:\n  detect_norms: [0.5, 1]\n")
    spec, _ = load_sweep_file(f)
    assert spec.axes == {"detect_baselines": ["nc,ss", "ac"]} and spec.size == 2
    assert {c.detect_norms for c in spec.configs()} == {"0.5,1"}  # fixed: a list is one value
    f.write_text("fixed:\n  detect_baselines: 'nc|ac'\n")
    with pytest.raises(SpaceError, match="fixed: holds one value"):
        load_sweep_file(f)
    f.write_text("grid:\n  detect_baselines: ['nc|ac', ss]\n")
    with pytest.raises(SpaceError, match="each element is one value"):
        load_sweep_file(f)


def test_plan_run_and_search_say_how_many_trials_before_ray(capsys):
    """Through the CLI, with no Ray: `plan` counts the trials; `run` / `search` print the count first
    (here a bad --cpus-per-trial then stops them before Ray starts)."""
    from sweeper.cli import main

    base = ["plan", "--theta", "0.1", "--kappa", "0", "--epochs", "1"]
    assert main([*base, "--set", "detect_baselines=nc,ss,ac"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 trials;") and "detect_baselines=nc,ss,ac" in out, out
    assert main([*base, "--set", "detect_baselines=nc,ss|ac"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 trials;") and "nc,ss" in out and " ac " in out, out
    assert main(["run", "--theta", "0.05,0.1", "--kappa", "0,1,2,3", "--cpus-per-trial", "0"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "launching sweep digits-demo: 8 trials (theta x kappa = 2 x 4) on local Ray\n", cap
    assert "--cpus-per-trial=0.0 is invalid" in cap.err
    assert main(["search", "--theta", "0.05,0.1", "--seeds", "3", "--budget", "5", "--cpus-per-trial", "0"]) == 2
    cap = capsys.readouterr()
    assert cap.out == (
        "launching search digits-search: budget 5 defences x 6 models each (theta x seed = 2 x 3) "
        "= up to 30 models on local Ray\n"
    ), cap
