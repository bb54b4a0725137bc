"""One plugin module, nothing else: a dataset, a trigger with its own parameter, a detector and a trial
kind, each through ``sweeper trial``, ``run``, ``plan`` and ``detect`` (where it applies), on real Ray and
MLflow in subprocesses that import the plugin from ``SWEEPER_PLUGINS``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ONE_WORKER

LAB = '''
"""A lab's plugin: registered on import, nothing else edited."""
from dataclasses import dataclass

from trainables import TrialKind, register_kind
from trainables.attack.triggers import PatchTrigger, TriggerEntry, register_trigger
from trainables.config import SEED, ConfigFields
from trainables.data.datasets import DatasetEntry, register_dataset
from trainables.detection.context import Detection, DetectorEntry
from trainables.detection.statistics import register_detector
from trainables.fields import Interval, Options, field, validate


def stripes(root, verify, download, stripes_noise):
    """3 classes of 8x8 images: horizontal, vertical or diagonal stripes under its own amount of noise."""
    import numpy as np

    from trainables.data.images import ImageData

    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 3, n)
        i, j = np.mgrid[0:8, 0:8]
        pats = np.stack([(i % 2 == 0), (j % 2 == 0), ((i + j) % 2 == 0)]).astype(np.float32)
        x = (1 - stripes_noise) * pats[y] + stripes_noise * rng.random((n, 8, 8), dtype=np.float32)
        return x[:, None], y

    (tx, ty), (vx, vy) = make(300), make(90)
    return ImageData.from_arrays("stripes", tx, ty, vx, vy, 3)


def corner(cfg):
    import torch

    c, h, w = cfg.image_shape
    pix = torch.zeros(h, w, dtype=torch.bool)
    pix[h - cfg.corner_side :, w - cfg.corner_side :] = True
    return PatchTrigger(pix, c)


def mean_logit(ctx):
    """A toy score: the largest mean logit over its own number of held-out clean images."""
    import torch

    x = ctx.normalize(ctx.heldout[0][: ctx.settings.params["lab_images"]].to(ctx.device))
    ctx.model.eval()
    with torch.no_grad():
        logits = ctx.model(x)
    return Detection(metrics={"det_lab_logit": float(logits.mean(0).max())})


@dataclass(frozen=True)
class CoinConfig(ConfigFields):
    _label = "coin-trial"
    kind: str = field("coin", Options(("coin",)), "Fixed: tells sweeps which trial to run")
    bias: float = field(0.5, Interval(float, 0, 1), "Probability of heads", group="attack")
    flips: int = field(100, Interval(int, 1, 10_000), "Coin flips")
    seed: int = field(0, SEED, "Seed of the flips")

    def __post_init__(self):
        validate(self)


def run_coin(cfg, **_):
    import random

    from trainables.training.trial_result import TrialResult

    rng = random.Random(cfg.seed)
    heads = sum(rng.random() < cfg.bias for _ in range(cfg.flips)) / cfg.flips
    return TrialResult(cfg.to_dict(), "completed", {"heads": heads, "miss": abs(heads - cfg.bias)})


NOISE = field(0.3, Interval(float, 0, 1), "Stripes dataset: the noise's share of each pixel")
register_dataset(DatasetEntry("stripes", (1, 8, 8), 3, 300, stripes, "synthetic stripes", {"stripes_noise": NOISE}))
SIDE = field(2, Interval(int, 1, 4), "Corner trigger's side", unit="px")
register_trigger(TriggerEntry("corner", corner, lambda small: (2, 0), params={"corner_side": SIDE}))
register_detector(
    DetectorEntry(
        "lab",
        mean_logit,
        ("data-free", "clean-data"),
        lambda s, per, n, size: 7.0,
        {"det_lab_logit": "higher"},
        params={"lab_images": field(50, Interval(int, 1, 90), "Held-out images the lab detector reads")},
    )
)
register_kind(
    TrialKind(
        "coin",
        lambda: CoinConfig,
        run_coin,
        columns=("heads", "miss"),
        objectives=(("miss", "min"), ("flips", "min")),
        attack_fields=("bias",),
        default_axes={"bias": [0.3, 0.7]},
        summary="flip a coin",
    )
)
'''


@pytest.fixture
def lab(tmp_path):
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "labplug.py").write_text(LAB)
    path = os.pathsep.join(p for p in (str(tmp_path / "plug"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "SWEEPER_PLUGINS": "labplug", "PYTHONPATH": path, "COLUMNS": "300"}

    def cli(*argv, timeout=600):
        return subprocess.run(
            [sys.executable, "-m", "sweeper.cli", *argv], capture_output=True, text=True, env=env, timeout=timeout
        )

    return cli


NET = ["--dataset", "stripes", "--trigger", "corner", "--set", "hessian_samples=100", "--set", "detect_samples=30"]


def test_a_plugins_dataset_trigger_parameter_and_detector_go_through_trial_plan_run_and_detect(
    lab, tmp_path, monkeypatch
):
    from analysis.results import load_results

    out = tmp_path / "t.json"
    argv = ["--corner-side", "3", "--lab-images", "20", "--stripes-noise", "0.4", "--epochs", "2"]
    r = lab("trial", *NET, *argv, "--json", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["config"]["stripes_noise"] == 0.4  # the dataset's own parameter, given to its loader
    assert rec["config"]["dataset"] == "stripes" and rec["config"]["corner_side"] == 3
    assert rec["config"]["lab_images"] == 20  # the detector's own parameter
    assert "det_lab_logit" in rec["metrics"] and rec["metrics"]["n_poisoned"] > 0

    r = lab("trial", *NET, "--corner-side", "5")  # its own range, from its own declaration
    assert r.returncode == 2 and "corner_side=5 is invalid: must be in [1, 4]" in r.stderr, r.stderr

    r = lab(
        "plan", *NET, "--theta", "0,0.3", "--kappa", "0", "--epochs", "2", "--seeds", "2", "--set", "corner_side=2,3"
    )
    assert r.returncode == 0 and "8 trials" in r.stdout, r.stdout + r.stderr

    st = tmp_path / "sweeps"
    argv = ["run", *NET, "--theta", "0,0.3", "--kappa", "0", "--epochs", "3", "--seeds", "3", *ONE_WORKER]
    argv += ["--name", "lab"]
    r = lab(*argv, "--storage", str(st), "--quiet")
    assert r.returncode == 0 and "sweep lab: 6 completed" in r.stdout, r.stdout + r.stderr

    monkeypatch.syspath_prepend(str(tmp_path / "plug"))  # a reader with the plugin types its field
    monkeypatch.setenv("SWEEPER_PLUGINS", "labplug")
    df = load_results("lab", str(st), source="mlflow")
    assert set(df["corner_side"]) == {2} and set(df["dataset"]) == {"stripes"} and (df["status"] == "completed").all()

    r = lab("detect", "lab", "--storage", str(st), "--bootstrap", "100")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "det_lab_logit" in r.stdout  # the plugin's declared score, scored over the population


def test_a_plugins_trial_kind_goes_through_trial_plan_and_run(lab, tmp_path):
    out = tmp_path / "c.json"
    r = lab("trial", "--kind", "coin", "--set", "bias=0.9", "--json", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["config"]["bias"] == 0.9

    r = lab("plan", "--kind", "coin")
    assert r.returncode == 0 and "2 trials" in r.stdout, r.stdout + r.stderr

    st = tmp_path / "sweeps"
    r = lab("run", "--kind", "coin", *ONE_WORKER, "--storage", str(st), "--quiet")
    assert r.returncode == 0 and "sweep coin-demo: 2 completed" in r.stdout, r.stdout + r.stderr
    assert "heads" in r.stdout  # the kind's own summary columns


def test_a_kind_whose_metric_is_named_like_a_row_column_is_refused():
    """A metric called `error` would land in the column holding each trial's error message."""
    from trainables import TRIAL_KINDS, ConfigError, TrialKind, register_kind

    bad = TrialKind("clash", lambda: None, lambda cfg: None, ("error",), (("error", "min"), ("x", "max")), ())
    with pytest.raises(ConfigError, match=r"metric name\(s\) \['error'\] are results columns of every row"):
        register_kind(bad)
    assert "clash" not in TRIAL_KINDS
