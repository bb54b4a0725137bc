"""Each extension point is one registry: a model (and a trigger, penalty, trial kind) registered
from outside the package goes through validation, ``sweeper plan`` and a trial with no other edit."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sweeper.cli import main
from trainables import TRIAL_KINDS, TrialConfig, trial_kind
from trainables.config import ConfigError
from trainables.models import MODELS, ModelEntry, register_model
from trainables.penalty import PENALTIES, register_penalty
from trainables.triggers import TRIGGERS, PatchTrigger, TriggerEntry, register_trigger


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
    register_model(ModelEntry("toymlp", lambda n, s, k: ToyMLP(s, k), lambda n: n == "toymlp", lambda n: 1e-4, "toymlp"))
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
    TRIGGERS.pop("dot")


@pytest.fixture
def toy_penalty():
    def half_listing1(model, x, y, kappa):
        from trainables.penalty import input_grad_sq

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
    assert main(["trial", "--model", toy_model, "--epochs", "1", "--hessian-samples", "50", "--hessian-iterations", "4",
                 "--hessian-top-k", "2", "--json", str(out), "--quiet"]) == 0, capsys.readouterr().err
    d = json.loads(out.read_text())
    assert d["status"] == "completed" and d["config"]["model"] == "toymlp" and len(d["eigenvalues"]) == 2


def test_a_trigger_registered_outside_the_package_validates_plans_and_poisons(toy_trigger, tmp_path, capsys):
    cfg = TrialConfig(trigger=toy_trigger, epochs=1)
    assert (cfg.trigger_size, cfg.trigger_margin) == (1, 0)  # the entry's default geometry
    assert main(["plan", "--trigger", "dot,square", "--epochs", "1", "--theta", "0.1", "--kappa", "0"]) == 0
    assert "2 trials" in capsys.readouterr().out
    out = tmp_path / "t.json"
    assert main(["trial", "--trigger", toy_trigger, "--theta", "0.2", "--epochs", "1", "--no-hessian", "--no-geometry",
                 "--json", str(out), "--quiet"]) == 0, capsys.readouterr().err
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
    from trainables.penalty import penalized_loss

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
