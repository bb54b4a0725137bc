"""The command line, in process through ``main`` and once as the installed console script."""

import json
import os
import subprocess
import sys

import pytest

from sweeper.cli import main


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["trial", "--theta", "1.5"], "theta=1.5 is invalid: must be in [0, 1)"),
        (["trial", "--theta", "abc"], "--theta"),
        (["trial", "--dataset", "imagenet"], "dataset='imagenet' is invalid: must be one of"),
        (["trial", "--kappa", "-1"], "kappa=-1.0 is invalid"),
        (["trial", "--target", "10"], "target=10 is invalid: must be in [0, 9]"),
        (["trial", "--model", "vgg"], "model='vgg' is invalid"),
        (["trial", "--epochs", "0"], "epochs=0 is invalid"),
        (["trial", "--no-such-flag"], "No such option"),
        (["trial", "--hessian-tol", "0"], "hessian_tol=0.0 is invalid: must be in (0, 1]"),
        (
            ["trial", "--hessian-max-iterations", "5"],
            "hessian_max_iterations=5 is invalid: must be in [20, 100000] (hessian_iterations)",
        ),
        (["trial", "--hessian-method", "lanczos"], "--hessian-method='lanczos' is invalid: must be one of"),
        (["trial", "--dataset", "mnist", "--data-dir", "/nonexistent"], "missing dataset file"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, needle, capsys):
    code, out, err = run(argv + ["--epochs", "1"] if "--epochs" not in argv else argv, capsys)
    assert code == 2
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert "epoch 1/" not in err  # nothing trained


def test_an_object_store_that_does_not_answer_is_one_line(tmp_path, capsys):
    # no such host (".invalid" never resolves): pyarrow's OSError is a bad --storage, not a traceback
    uri = "s3://sweeper-test.invalid/sweeps"
    code, _, err = run(["run", "--storage", uri, "--mlflow-uri", f"sqlite:///{tmp_path}/m.db", "--quiet"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--storage {uri}: cannot reach it (" in err


def test_unavailable_cuda_is_a_bad_input(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = run(["trial", "--device", "cuda:0", "--epochs", "1"], capsys)
    assert code == 2 and "device='cuda:0' is invalid: CUDA is not available" in err


def test_epochs_between_evaluations_print_no_scores(capsys):
    """eval_every=2: epoch 1's line has the loss only (no NaN scores, not called diverged), epoch 2 its scores."""
    code, _, err = run(["trial", "--epochs", "2", "--eval-every", "2", "--no-hessian", "--no-geometry"], capsys)
    assert code == 0, err
    first = next(line for line in err.splitlines() if "epoch 1/2" in line)
    second = next(line for line in err.splitlines() if "epoch 2/2" in line)
    assert "loss=" in first and "clean=" not in first and "nan" not in first and "diverged" not in first, first
    assert "clean=" in second and "asr=" in second, second


def test_trial_writes_json_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, err = run(["trial", "--epochs", "2", "--no-hessian", "--no-geometry", "--json", str(out)], capsys)
    assert code == 0, err
    d = json.loads(out.read_text())
    assert d["status"] == "completed" and d["config"]["epochs"] == 2
    assert {"clean_acc", "asr", "train_acc", "train_loss", "penalty", "n_poisoned"} <= set(d["metrics"])
    assert "epoch 2/2" in err and "clean_acc=" in stdout
    before = out.read_text()
    code, _, err = run(["trial", "--epochs", "1", "--json", str(out)], capsys)
    assert code == 2 and "refusing to overwrite" in err
    assert out.read_text() == before


def test_config_file_with_flag_override(tmp_path, capsys):
    cfgf = tmp_path / "trial.yaml"
    cfgf.write_text("theta: 0.2\nkappa: 5\nepochs: 1\nhessian: false\ngeometry: false\n")
    out = tmp_path / "r.json"
    code, _, err = run(["trial", "--config", str(cfgf), "--kappa", "7", "--json", str(out)], capsys)
    assert code == 0, err
    cfg = json.loads(out.read_text())["config"]
    assert (cfg["theta"], cfg["kappa"], cfg["epochs"]) == (0.2, 7.0, 1)
    cfgf.write_text("thetaa: 0.2\n")
    code, _, err = run(["trial", "--config", str(cfgf)], capsys)
    assert code == 2 and "unknown field(s) ['thetaa']" in err
    cfgf.write_text("theta: [0.2\n")
    code, _, err = run(["trial", "--config", str(cfgf)], capsys)
    assert code == 2 and "is not valid YAML" in err


def test_trial_on_tiny_mnist_files(mnist_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    code, _, err = run(
        [
            "trial",
            "--dataset",
            "mnist",
            "--data-dir",
            str(mnist_dir),
            "--no-verify-checksums",
            "--epochs",
            "1",
            "--no-hessian",
            "--no-geometry",
            "--json",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads(out.read_text())["config"]["data_dir"] == str(mnist_dir)
    code, _, err = run(["trial", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--epochs", "1"], capsys)
    assert code == 2 and "corrupt dataset file" in err


def test_checkpoint_resume_from_the_cli(tmp_path, capsys):
    ck = tmp_path / "t.pt"
    args = ["trial", "--epochs", "2", "--no-hessian", "--no-geometry", "--checkpoint", str(ck)]
    assert run(args + ["--json", str(tmp_path / "a.json")], capsys)[0] == 0
    code, _, err = run(args + ["--json", str(tmp_path / "b.json")], capsys)
    assert code == 0 and "epoch" not in err  # already finished: nothing re-run
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["metrics"]["clean_acc"] == b["metrics"]["clean_acc"]


def test_console_script_exit_code():
    exe = [sys.executable, "-m", "sweeper.cli"]
    r = subprocess.run(exe + ["trial", "--theta", "2"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "theta=2.0" in r.stderr
    r = subprocess.run(exe + ["trial", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--kappa" in r.stdout
    wide = {**os.environ, "COLUMNS": "250", "TERM": "dumb"}
    r = subprocess.run(exe + ["search", "--help"], capture_output=True, text=True, env=wide)
    assert "[default: the config's seed]" in r.stdout, r.stdout  # not eaten as Rich markup


@pytest.mark.parametrize(
    "argv", [["--help"], ["run", "--help"], ["run", "--theta", "2"], ["trial", "--theta", "2"], ["status", "nosuch"]]
)
def test_help_and_bad_inputs_answer_without_importing_torch(argv, tmp_path):
    """torch costs ~1.5 s to import: a help text or a refused flag is answered before it loads."""
    probe = "import sys; from sweeper.cli import main; code = main(sys.argv[1:]); sys.exit(code + 10 * ('torch' in sys.modules))"
    r = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode in (0, 2), (r.returncode, r.stderr)  # 10 more: torch was imported


def test_kernel_and_linear_trials_from_the_cli(tmp_path, capsys):
    out = tmp_path / "k.json"
    code, stdout, err = run(
        ["trial", "--kind", "kernel", "--set", "m=16", "--set", "r=0.1", "--json", str(out)], capsys
    )
    assert code == 0, err
    d = json.loads(out.read_text())
    assert d["config"]["kind"] == "kernel" and d["config"]["m"] == 16
    assert d["metrics"]["delta_f_rel_err"] < 1e-3
    code, stdout, err = run(["trial", "--kind", "linear", "--theta", "0.05"], capsys)
    assert code == 0 and "step_rel_err=" in stdout, err
    code, _, err = run(["trial", "--kind", "kernel", "--epochs", "3"], capsys)
    assert code == 2 and "--epochs does not apply to --kind kernel" in err
    code, _, err = run(["trial", "--kind", "kernel", "--set", "m=-1"], capsys)
    assert code == 2 and "m=-1 is invalid" in err


def test_theory_command_writes_figures_and_summary(tmp_path, capsys):
    out = tmp_path / "th"
    code, stdout, err = run(
        ["theory", "--out", str(out), "--m", "0,1,2,8,64,512", "--r", "log:0.001:1:6", "--set", "dim=5"], capsys
    )
    assert code == 0, err
    assert (out / "theory.png").read_bytes().startswith(b"\x89PNG") and (out / "theory.svg").exists()
    s = json.loads((out / "summary.json").read_text())
    # the secant over m in [0, 1] vs eq 12's tangent: equal up to c / (c + 1 + lam), c = 20 here
    assert s["slope_small_m"] == pytest.approx(s["slope_small_m_closed"], rel=0.1)
    assert s["max_rel_err_delta_f"] < 1e-3 and s["max_rel_err_spike"] < 1e-3
    assert run(["theory", "--out", str(out)], capsys)[0] == 2  # never overwrites


def test_cifar_preresnet_warp_trial_end_to_end(cifar_dir, tmp_path, capsys):
    out = tmp_path / "c.json"
    code, _, err = run(
        [
            "trial",
            "--dataset",
            "cifar10",
            "--data-dir",
            str(cifar_dir),
            "--no-verify-checksums",
            "--model",
            "preresnet8",
            "--trigger",
            "warp",
            "--augment",
            "--kappa",
            "100",
            "--epochs",
            "2",
            "--poison-mode",
            "stochastic",
            "--hessian-samples",
            "40",
            "--hessian-iterations",
            "6",
            "--json",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    d = json.loads(out.read_text())
    assert d["status"] == "completed" and d["config"]["lr"] == 0.1 and d["config"]["batch_size"] == 128
    assert (
        len(d["eigenvalues"]) == 5 and 1 <= len(d["geometry"]) <= 10
    )  # classes absent from the tiny test set are skipped
    assert "det_class_flip_max" in d["metrics"]  # per-class curvature on 3072 pixels: ARPACK's top pair, seconds


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--detect-baselines", "nc,strip"], "unknown strip; valid: nc, ss, ac"),
        (["--detect-norms", "-0.5"], "detect_norms='-0.5' is invalid"),
        (
            ["--detect-windows", "2,9"],
            "detect_windows='2,9' is invalid: each item must be an integer in [1, 8] (image side)",
        ),
        (["--trigger", "blend", "--blend-alpha", "0"], "blend_alpha=0.0 is invalid"),
    ],
)
def test_bad_detection_values_are_one_line_exit_2(argv, needle, capsys):
    code, out, err = run(["trial", "--epochs", "1", *argv], capsys)
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_trial_with_every_baseline_end_to_end(tmp_path, capsys):
    from sweeper.tracking import write_artifacts
    from trainables import TrialConfig, run_trial

    out = tmp_path / "d.json"
    code, stdout, err = run(
        [
            "trial",
            "--trigger",
            "square",
            "--epochs",
            "2",
            "--lr",
            "0.05",
            "--hessian-samples",
            "200",
            "--hessian-iterations",
            "8",
            "--hessian-top-k",
            "3",
            "--detect-baselines",
            "nc,ss,ac",
            "--nc-steps",
            "30",
            "--detect-samples",
            "100",
            "--json",
            str(out),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    d = json.loads(out.read_text())
    m = d["metrics"]
    for key in (
        "det_lambda_ratio",
        "det_lambda_trace_ratio",
        "det_ipr_max",
        "det_window_frac_w2",
        "det_flip_max",
        "nc_anomaly_index",
        "nc_flagged",
        "nc_class",
        "ss_score_max",
        "ss_auroc",
        "ac_silhouette_max",
        "ac_auroc",
    ):
        assert key in m, key
    assert d["config"]["detect_baselines"] == "nc,ss,ac"
    assert set(d["detection"]["details"]) == {"spectral", "localisation", "flip", "class", "gradient", "nc", "ss", "ac"}
    assert "det_flip_max=" in stdout and "nc_anomaly_index=" in stdout
    # the files a tracked trial logs: detection.json and the PNGs
    res = run_trial(TrialConfig(**d["config"]))
    files = {p.name for p in write_artifacts(res, tmp_path)}
    assert {"detection.json", "localisation.png", "nc_triggers.png", "nc_masks.png"} <= files
    assert json.loads((tmp_path / "detection.json").read_text())["metrics"]["nc_class"] == res.metrics["nc_class"]


def test_set_beats_config_file_and_flags_in_trial(tmp_path, capsys):
    cfgf = tmp_path / "trial.yaml"
    cfgf.write_text("lr: 0.02\nepochs: 1\nhessian: false\ngeometry: false\n")
    out = tmp_path / "r.json"
    code, _, err = run(["trial", "--config", str(cfgf), "--lr", "0.03", "--set", "lr=0.05", "--json", str(out)], capsys)
    assert code == 0, err
    assert json.loads(out.read_text())["config"]["lr"] == 0.05


# ----------------------------------------------------------------------------- one merge order in every command
def _fixed(out: str) -> dict[str, str]:
    """``plan``'s ``N trials; fixed: k=v, ...`` line as a dict of printed values."""
    line = next(ln for ln in out.splitlines() if " trials; fixed: " in ln)
    return dict(kv.split("=", 1) for kv in line.split(" trials; fixed: ", 1)[1].split(", "))


def test_merge_order_in_plan_defaults_file_flags_set(tmp_path, capsys):
    """plan builds run's spec: defaults < sweep file < flags < --set."""
    f = tmp_path / "s.yaml"
    f.write_text("grid:\n  theta: [0.05, 0.1]\nfixed:\n  kappa: 5\n  epochs: 3\n  lr: 0.02\n  momentum: 0.5\n")
    code, out, err = run(
        [
            "plan",
            "--sweep-file",
            str(f),
            "--theta",
            "0.2",
            "--kappa",
            "7",
            "--epochs",
            "2",
            "--set",
            "kappa=9",
            "--set",
            "lr=0.05",
        ],
        capsys,
    )
    assert code == 0, err
    fixed = _fixed(out)
    assert out.startswith("1 trials") and fixed["theta"] == "0.2"  # a flag replaces the file's grid axis
    assert fixed["kappa"] == "9.0"  # --set beats the flag, which beat the file
    assert fixed["epochs"] == "2" and fixed["lr"] == "0.05"  # a flag / --set beats the file
    assert fixed["momentum"] == "0.5"  # the file beats the default (0.9)
    code, out, err = run(["plan", "--sweep-file", str(f), "--kappa", "7", "--set", "kappa=1,2"], capsys)
    assert code == 0 and "kappa" not in _fixed(out) and out.startswith("4 trials"), out  # --set turns it into an axis


@pytest.mark.parametrize("cmd", ["run", "plan"])
@pytest.mark.parametrize(
    "layers,bad",
    [
        (("file:lr: 0.05", "--set", "lr=-1"), "lr=-1.0 is invalid"),  # --set beats the file
        (("file:kappa: 5", "--kappa", "-1"), "kappa=-1.0 is invalid"),  # a flag beats the file
        (("file:kappa: 5", "--kappa", "5", "--set", "kappa=-2"), "kappa=-2.0 is invalid"),  # --set beats the flag
    ],
)
def test_the_winning_layer_of_run_is_the_one_validated(cmd, layers, bad, tmp_path, capsys):
    """The winner carries an invalid value: exit 2 before Ray, the one line naming the winner's value."""
    f = tmp_path / "s.yaml"
    f.write_text(f"fixed:\n  epochs: 1\n  {layers[0].removeprefix('file:')}\n")
    st = tmp_path / "st"
    where = ["--name", "m", "--storage", str(st)] if cmd == "run" else []
    code, _, err = run([cmd, "--sweep-file", str(f), *layers[1:], *where], capsys)
    assert code == 2 and bad in err and len(err.strip().splitlines()) == 1, err
    assert not (st / "m").exists()  # nothing started


@pytest.mark.parametrize(
    "layers,field",
    [
        (("file:lr: -1", "--set", "lr=0.05"), "lr"),  # the file's invalid lr is replaced by --set
        (("file:kappa: -1", "--kappa", "5"), "kappa"),  # ... by a flag
        (("file:kappa: 1", "--kappa", "-1", "--set", "kappa=5"), "kappa"),  # the flag's by --set
    ],
)
def test_a_losing_layers_invalid_value_is_never_validated_in_run(layers, field, tmp_path, capsys):
    """The converse: the only error left is the stopper's (detect_norms, checked after every field above)."""
    f = tmp_path / "s.yaml"
    f.write_text(f"fixed:\n  epochs: 1\n  {layers[0].removeprefix('file:')}\n")
    st = tmp_path / "st"
    code, _, err = run(
        ["run", "--sweep-file", str(f), *layers[1:], "--set", "detect_norms=-1", "--name", "m", "--storage", str(st)],
        capsys,
    )
    assert code == 2 and "detect_norms='-1' is invalid" in err, err
    assert f"{field}=" not in err.split("(grid point")[0].replace("detect_norms=", ""), err
    assert not (st / "m").exists()
    code, out, err = run(["plan", "--sweep-file", str(f), *layers[1:]], capsys)  # and plan takes the winner
    assert code == 0 and _fixed(out)[field] in ("0.05", "5.0"), err


@pytest.mark.parametrize(
    "argv,bad",
    [
        (["--epochs", "0"], "epochs=0 is invalid"),  # a flag beats the embedded default (15)
        (["--set", "kappa=-1"], "kappa=-1.0 is invalid"),  # --set beats the default kappa range
        (["--epochs", "2", "--set", "epochs=0"], "epochs=0 is invalid"),  # --set beats the flag
        (
            ["--epochs", "0", "--set", "epochs=2", "--set", "detect_norms=-1"],
            "detect_norms='-1' is invalid",
        ),  # converse
        (["--kappa", "-1", "--set", "kappa=5", "--set", "detect_norms=-1"], "detect_norms='-1' is invalid"),
    ],
)
def test_merge_order_in_search_defaults_flags_set(argv, bad, tmp_path, capsys):
    st = tmp_path / "st"
    code, _, err = run(["search", *argv, "--budget", "1", "--name", "m", "--storage", str(st)], capsys)
    assert code == 2 and bad in err and len(err.strip().splitlines()) == 1, err
    if "detect_norms" in bad:
        assert "epochs=" not in err and "kappa=" not in err.split("(search-space corner")[0], err
    assert not (st / "m").exists()


# ----------------------------------------------------------------------------- issue 20, item 9: bad inputs, said alike
@pytest.mark.parametrize(
    "argv,line",
    [
        (["trial", "--theta", "abc"], "--theta='abc' is invalid: expected a number"),
        (["trial", "--epochs", "x"], "--epochs='x' is invalid: expected a whole number"),
        (["trial", "--hessian-method", "nope"], "--hessian-method='nope' is invalid: must be one of 'auto'"),
        (["run", "--set", "foo=1"], "--set foo=1 is invalid: foo is not a network-trial field"),
        (["theory", "--m", "-1"], "--m=-1 is invalid: expected at least two values"),
        (["trial", "--no-hessian", "--detect"], "detect=True is invalid: needs hessian=true"),
    ],
)
def test_every_bad_value_reads_name_value_is_invalid_and_what_is_valid(argv, line, capsys, tmp_path):
    code, out, err = run(argv + (["--out", str(tmp_path / "t")] if argv[0] == "theory" else []), capsys)
    assert code == 2 and line in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_an_empty_name_is_refused_not_replaced(tmp_path, capsys):
    code, out, err = run(["run", "--name", "", "--storage", str(tmp_path)], capsys)
    assert code == 2 and "--name '' is invalid" in err, err
    assert list(tmp_path.iterdir()) == []  # not the default sweep under another name


def test_a_sqlite_uri_in_a_missing_folder_is_refused_and_nothing_is_created(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "dir"
    code, out, err = run(["run", "--mlflow-uri", f"sqlite:///{missing}/m.db", "--storage", str(tmp_path / "s")], capsys)
    assert code == 2 and f"folder {missing} does not exist" in err, err
    assert not (tmp_path / "no").exists()


def test_no_hessian_turns_detection_off_unless_asked_for(capsys):
    from trainables import TrialConfig

    assert TrialConfig(hessian=False).detect is False  # the statistics need the spectrum
    assert TrialConfig().detect is True
    # asking for both is refused in every command, before anything runs ...
    for argv in (
        ["plan", "--set", "hessian=false", "--set", "detect=true"],
        ["run", "--set", "hessian=false", "--set", "detect=true", "--name", "x", "--storage", "/nonexistent"],
    ):
        code, _, err = run(argv, capsys)
        assert code == 2 and "detect=True is invalid: needs hessian=true" in err, err
    # ... but a record written when detect defaulted to true (an old sweep with hessian=false) still reads:
    # a resume must not fail on its own old config
    old = TrialConfig.from_dict({"hessian": False, "detect": True})
    assert old.detect is True and old.hessian is False


def test_a_ctrl_c_that_lands_in_a_garbage_collection_callback_still_interrupts():
    """Python cannot raise from a ``__del__`` or a weakref callback: without the hook the interrupt is printed as
    "Exception ignored" and lost (seen: a `report` stopped so went on to exit 0). In a process of its own, whose
    main thread takes SIGINT as the CLI's does (a pytest-xdist worker ignores it)."""
    script = """
import time
from sweeper.cli import keep_interrupts

class InterruptedWhileCollected:
    def __del__(self):
        raise KeyboardInterrupt

for hook in (False, True):
    if hook:
        keep_interrupts()
        keep_interrupts()  # once only
    try:
        InterruptedWhileCollected()  # collected at once: its __del__ raises where nothing can catch it
        deadline = time.monotonic() + (30 if hook else 1)  # a hang guard: the interrupt comes 50 ms later
        while time.monotonic() < deadline:
            pass
        print("lost")
    except KeyboardInterrupt:
        print("interrupted")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["lost", "interrupted"], r.stdout + r.stderr  # lost without the hook, kept with it
