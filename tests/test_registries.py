"""Each extension point is one registry: a model (and a trigger, penalty, trial kind) registered
from outside the package goes through validation, ``sweeper plan``, the CLI's help and a trial with no
other edit; a plugin module named in SWEEPER_PLUGINS does the same for the console script and a sweep's
Ray workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from sweeper.cli import main
from tests.processes import descendants, proc_cmdline
from trainables import TRIAL_KINDS, TrialConfig, trial_kind
from trainables.attack.triggers import TRIGGERS, PatchTrigger, TriggerEntry, register_trigger
from trainables.config import ConfigError
from trainables.defence.penalty import PENALTIES, register_penalty
from trainables.networks.models import MODELS, ModelEntry, register_model


class ToyMLP(nn.Module):
    """One hidden ReLU layer: piecewise linear, with the features/head split the trial code expects."""

    piecewise_linear = True

    def __init__(self, in_shape, num_classes):
        super().__init__()
        d = in_shape[0] * in_shape[1] * in_shape[2]
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture
def toy_model():
    register_model(
        ModelEntry("toymlp", lambda n, s, k: ToyMLP(s, k), lambda n: n == "toymlp", lambda n: 1e-4, "toymlp")
    )
    yield "toymlp"
    MODELS.pop("toymlp")


@pytest.fixture
def toy_trigger():
    def dot(cfg):  # one bright pixel in the image centre
        c, h, w = cfg.image_shape
        pix = torch.zeros(h, w, dtype=torch.bool)
        pix[h // 2, w // 2] = True
        return PatchTrigger(pix, c)

    register_trigger(TriggerEntry("dot", dot, lambda small: (1, 0)))
    yield "dot"
    TRIGGERS.pop("dot", None)


@pytest.fixture
def toy_penalty():
    def half_listing1(model, x, y, kappa):
        from trainables.defence.penalty import input_grad_sq

        ce, sq = input_grad_sq(model, x, y)
        return ce, 0.5 * kappa * sq

    register_penalty("half", half_listing1)
    yield "half"
    PENALTIES.pop("half")


def test_a_model_registered_outside_the_package_validates_plans_and_trains(toy_model, tmp_path, capsys):
    cfg = TrialConfig(model=toy_model, epochs=1)
    assert cfg.model == "toymlp"
    assert main(["plan", "--model", "toymlp,cnn", "--epochs", "1", "--theta", "0.1", "--kappa", "0"]) == 0
    assert "2 trials" in capsys.readouterr().out
    out = tmp_path / "t.json"
    assert (
        main(
            [
                "trial",
                "--model",
                toy_model,
                "--epochs",
                "1",
                "--hessian-samples",
                "50",
                "--hessian-iterations",
                "4",
                "--hessian-top-k",
                "2",
                "--json",
                str(out),
                "--quiet",
            ]
        )
        == 0
    ), capsys.readouterr().err
    d = json.loads(out.read_text())
    assert d["status"] == "completed" and d["config"]["model"] == "toymlp" and len(d["eigenvalues"]) == 2


def test_a_trigger_registered_outside_the_package_validates_plans_and_poisons(toy_trigger, tmp_path, capsys):
    cfg = TrialConfig(trigger=toy_trigger, epochs=1)
    assert (cfg.trigger_size, cfg.trigger_margin) == (1, 0)  # the entry's default geometry
    assert main(["plan", "--trigger", "dot,square", "--epochs", "1", "--theta", "0.1", "--kappa", "0"]) == 0
    assert "2 trials" in capsys.readouterr().out
    out = tmp_path / "t.json"
    assert (
        main(
            [
                "trial",
                "--trigger",
                toy_trigger,
                "--theta",
                "0.2",
                "--epochs",
                "1",
                "--no-hessian",
                "--no-geometry",
                "--json",
                str(out),
                "--quiet",
            ]
        )
        == 0
    ), capsys.readouterr().err
    d = json.loads(out.read_text())
    assert d["config"]["trigger"] == "dot" and d["metrics"]["n_poisoned"] > 0


def test_unknown_names_list_the_registered_ones(toy_model, capsys):
    with pytest.raises(ConfigError, match="toymlp"):
        TrialConfig(model="vgg")
    assert main(["trial", "--penalty", "l2", "--epochs", "1"]) == 2
    assert "must be one of listing1, eq25" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="network, kernel, linear"):
        trial_kind("gp")
    with pytest.raises(ConfigError, match="lshape, square, warp, blend"):
        TrialConfig(trigger="star")


def test_a_registered_penalty_is_used_by_name_never_silently_replaced(toy_penalty):
    from trainables.defence.penalty import penalized_loss

    torch.manual_seed(0)
    model, x, y = ToyMLP((1, 4, 4), 3), torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    _, _, half = penalized_loss(model, x, y, 2.0, "half")
    _, _, full = penalized_loss(model, x, y, 2.0, "listing1")
    assert float(half.detach()) == pytest.approx(0.5 * float(full.detach()), rel=1e-6)
    with pytest.raises(ValueError, match="penalty='eq26' is invalid"):
        penalized_loss(model, x, y, 1.0, "eq26")
    assert TrialConfig(penalty="half", epochs=1).penalty == "half"


def test_trial_kinds_name_their_summary_and_objectives():
    assert set(TRIAL_KINDS) == {"network", "kernel", "linear"}
    for kind in TRIAL_KINDS.values():
        assert kind.objectives and kind.columns and kind.default_axes
        fields = {f for f in kind.config().__dataclass_fields__}
        assert set(kind.default_axes) <= fields and set(kind.attack_fields) <= fields


# ----------------------------------------------------------------------------- the CLI's help reads the registries
def _help(argv, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "300")  # one line per option: names are never wrapped apart
    capsys.readouterr()
    assert main([*argv, "--help"]) == 0
    return capsys.readouterr().out


def test_registered_names_show_in_every_commands_help(toy_model, toy_trigger, toy_penalty, capsys, monkeypatch):
    text = _help(["trial"], capsys, monkeypatch)
    assert "Backdoor trigger; one of lshape, square, warp, blend, sig, dot." in text, text
    assert "A registered model; cnn, linear, preresnet<depth = 6n+2 >= 8> (e.g. preresnet20) or toymlp." in text, text
    assert "eq25 = kappa/2*mean_i||grad_x l_i||^2 (eq. 25); half." in text, (
        text
    )  # a penalty without a docstring: its name
    for command in ("run", "plan", "search"):
        text = _help([command], capsys, monkeypatch)
        assert "Triggers: lshape, square, warp, blend, sig, dot." in text, (command, text)
        assert "or toymlp." in text, (command, text)
    TRIGGERS.pop("dot")
    assert "dot" not in _help(["run"], capsys, monkeypatch)  # read at each call, not once at import


# ----------------------------------------------------------------------------- plugins: SWEEPER_PLUGINS, entry points
PLUGIN = '''
"""A toy plugin: a one-pixel trigger with its own parameter and a one-layer model, registered on import."""
from trainables.fields import Interval, field
from trainables.networks.models import ModelEntry, register_model
from trainables.attack.triggers import PatchTrigger, TriggerEntry, register_trigger


def centre_pixel(cfg):
    import torch  # inside the builder: importing the plugin stays cheap for `sweeper --help`

    c, h, w = cfg.image_shape
    pix = torch.zeros(h, w, dtype=torch.bool)
    pix[h // 2, w // 2] = True
    return PatchTrigger(pix, c, cfg.toy_brightness)  # the trigger's own parameter, read like any field


def linear_net(name, shape, classes):
    from torch import nn

    class Net(nn.Module):
        piecewise_linear = True

        def __init__(self):
            super().__init__()
            self.head = nn.Linear(shape[0] * shape[1] * shape[2], classes)

        def features(self, x):
            return x.flatten(1)

        def forward(self, x):
            return self.head(self.features(x))

    return Net()


BRIGHTNESS = field(1.0, Interval(float, 0, 1, closed="right"), "Toy trigger: how far its pixel moves to 1")
register_trigger(TriggerEntry("toy", centre_pixel, lambda small: (1, 0), params={"toy_brightness": BRIGHTNESS}))
register_model(ModelEntry("toynet", linear_net, lambda n: n == "toynet", lambda n: 1e-4, "toynet"))
'''


def _plugin_env(folder, plugins: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "SWEEPER_PLUGINS": plugins, "PYTHONPATH": path, "COLUMNS": "300"}


def _cli(argv, env, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "sweeper.cli", *argv], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_a_plugin_named_in_the_environment_registers_for_the_console_script(tmp_path):
    (tmp_path / "toyplug.py").write_text(PLUGIN)
    env = _plugin_env(tmp_path, "toyplug")
    r = _cli(
        ["plan", "--set", "trigger=toy", "--model", "toynet,cnn", "--theta", "0.1", "--kappa", "0", "--epochs", "1"],
        env,
    )
    assert r.returncode == 0, r.stderr
    assert "2 trials" in r.stdout and "trigger=toy" in r.stdout, r.stdout
    r = _cli(["run", "--help"], env)
    assert "Triggers: lshape, square, warp, blend, sig, toy." in r.stdout and "or toynet." in r.stdout, r.stdout
    r = _cli(["plan", "--set", "trigger=toy"], {**os.environ, "SWEEPER_PLUGINS": ""})  # no plugin: no toy
    assert r.returncode == 2 and "trigger='toy' is invalid: must be one of lshape, square, warp, blend" in r.stderr


def test_a_plugin_triggers_own_parameter_is_a_field_everywhere(tmp_path):
    """Declared once in the plugin (default, range, help): a `trial` option with its range, a --set axis,
    validated with the one-line error, part of the threat, and in the trial's record."""
    (tmp_path / "toyplug.py").write_text(PLUGIN)
    env = _plugin_env(tmp_path, "toyplug")
    r = _cli(["trial", "--help"], env)
    assert "--toy-brightness" in r.stdout and "Toy trigger: how far its pixel moves to 1; in (0, 1]." in r.stdout
    r = _cli(["plan", "--set", "trigger=toy", "--set", "toy_brightness=0.5,1", "--kappa", "0", "--theta", "0.1"], env)
    assert r.returncode == 0 and "2 trials" in r.stdout, r.stdout + r.stderr
    r = _cli(["trial", "--set", "trigger=toy", "--toy-brightness", "2", "--epochs", "1"], env)
    assert r.returncode == 2 and "toy_brightness=2.0 is invalid: must be in (0, 1]" in r.stderr, r.stderr
    out = tmp_path / "t.json"
    argv = ["trial", "--trigger", "toy", "--toy-brightness", "0.5", "--epochs", "1", "--no-hessian", "--no-geometry"]
    r = _cli([*argv, "--json", str(out), "--quiet"], env)
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["config"]["toy_brightness"] == 0.5 and rec["config"]["trigger"] == "toy"
    check = "from trainables.config import threat_fields; print(threat_fields())"
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=120)
    assert "toy_brightness" in r.stdout, r.stdout + r.stderr


def _idle_workers() -> list[str]:
    """The worker processes the running local Ray's raylet started that have no task or actor (``ray::IDLE``)."""
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    pids = [e.name for e in Path("/proc").iterdir() if e.name.isdigit()]
    raylets = [p for p in pids if "raylet/raylet " in (cmd := proc_cmdline(p)) and session in cmd]
    return [p for r in raylets for p in descendants(int(r)) if proc_cmdline(p).startswith("ray::IDLE")]


def test_start_ray_forwards_the_plugins_and_pythonpath_to_the_workers(tmp_path, monkeypatch):
    import ray

    from sweeper.orchestrate import start_ray

    monkeypatch.setenv("SWEEPER_PLUGINS", "toyplug")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    if ray.is_initialized():
        ray.shutdown()
    start_ray(None)
    try:
        env = ray.get_runtime_context().runtime_env["env_vars"]  # what nodes other than the driver's get
        time.sleep(1)  # a prestart would have begun by now (plain ray.init: two idle workers here)
        if Path("/proc/self/stat").exists():  # read from Linux's /proc
            assert _idle_workers() == [], "a local sweep's Ray prestarts no idle workers (trials start their own)"
        first = ray.get_runtime_context().gcs_address
        start_ray(None)  # the next sweep in this process: the same Ray, its workers already right
        assert ray.get_runtime_context().gcs_address == first
        monkeypatch.setenv("SWEEPER_PLUGINS", "toyplug,other")
        start_ray(None)  # workers that must import another plugin: a new Ray with the new environment
        assert ray.get_runtime_context().gcs_address != first
        assert ray.get_runtime_context().runtime_env["env_vars"]["SWEEPER_PLUGINS"] == "toyplug,other"
    finally:
        ray.shutdown()
    assert env["SWEEPER_PLUGINS"] == "toyplug" and env["PYTHONPATH"] == str(tmp_path)
    ray.init(address="local", num_cpus=1, include_dashboard=False, configure_logging=False)  # the caller's own
    try:
        own = ray.get_runtime_context().gcs_address
        start_ray(None)
        assert ray.get_runtime_context().gcs_address == own  # used as it is, never shut down for it
    finally:
        ray.shutdown()


def test_a_missing_or_failing_plugin_is_one_line_exit_2(tmp_path):
    r = _cli(["plan"], _plugin_env(tmp_path, "nosuchplug"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert (
        "sweeper: error: plugin 'nosuchplug' from SWEEPER_PLUGINS cannot be imported: ModuleNotFoundError" in r.stderr
    )
    (tmp_path / "badplug.py").write_text("raise RuntimeError('half-written plugin')\n")
    r = _cli(["--help"], _plugin_env(tmp_path, "badplug"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "plugin 'badplug' from SWEEPER_PLUGINS cannot be imported: RuntimeError: half-written plugin" in r.stderr


def test_plugins_load_on_first_use_of_a_registry_in_process(tmp_path, monkeypatch, capsys):
    """No CLI: a Python caller (or a Ray worker) validating a config imports SWEEPER_PLUGINS first."""
    from trainables.plugins import PluginError, load_plugins

    (tmp_path / "toyplug_inproc.py").write_text(PLUGIN.replace('"toy"', '"toy2"').replace('"toynet"', '"toynet2"'))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SWEEPER_PLUGINS", " toyplug_inproc, ")
    try:
        assert TrialConfig(trigger="toy2", model="toynet2", epochs=1).trigger == "toy2"
        assert "toyplug_inproc" in load_plugins()
    finally:
        TRIGGERS.pop("toy2", None)
        MODELS.pop("toynet2", None)
    monkeypatch.setenv("SWEEPER_PLUGINS", "toyplug_inproc,nosuch_inproc")
    with pytest.raises(PluginError, match="plugin 'nosuch_inproc' from SWEEPER_PLUGINS cannot be imported"):
        TrialConfig()
    assert main(["plan"]) == 2  # and again on every use, until it is fixed
    assert "nosuch_inproc" in capsys.readouterr().err


def test_an_installed_distributions_entry_point_is_a_plugin_too(tmp_path):
    """A ``sweeper.plugins`` entry point names a module (imported) or a function (called once)."""
    (tmp_path / "toyplug.py").write_text(PLUGIN)
    (tmp_path / "toyfn.py").write_text(
        "def register():\n    from trainables.defence.penalty import PENALTIES, register_penalty\n\n"
        "    register_penalty('eq25-too', PENALTIES['eq25'])\n"
    )
    dist = tmp_path / "toylab-0.1.dist-info"  # what `pip install` leaves: found on sys.path by importlib.metadata
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toylab\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[sweeper.plugins]\ntoy = toyplug\npen = toyfn:register\n")
    env = {**_plugin_env(tmp_path, ""), "SWEEPER_PLUGINS": ""}
    r = _cli(
        [
            "plan",
            "--set",
            "trigger=toy",
            "--set",
            "penalty=eq25-too",
            "--theta",
            "0.1",
            "--kappa",
            "1",
            "--epochs",
            "1",
        ],
        env,
    )
    assert r.returncode == 0 and "trigger=toy" in r.stdout and "penalty=eq25-too" in r.stdout, r.stdout + r.stderr
    (dist / "entry_points.txt").write_text("[sweeper.plugins]\nbroken = toyfn:nosuch\n")
    r = _cli(["plan"], env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "plugin entry point broken = 'toyfn:nosuch' (group sweeper.plugins, distribution toylab) failed" in r.stderr
