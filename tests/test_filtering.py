"""Filter-and-retrain defences (trainables/detection/filtering.py): the per-sample curvature share against a
float64 reference, which samples a filter removes, how a removal is scored against the true mask, and the
two-stage trial (hidden mask, theta 0, a kill during the retrain, ``none`` unchanged)."""

import json
import math
import signal
import subprocess
import sys

import pytest
import torch

from trainables.config import TrialConfig
from trainables.data.images import load_digits
from trainables.detection.filtering import (
    FILTERS,
    FilterEntry,
    FilterScores,
    class_direction_shares,
    register_filter,
    removal_quality,
    sample_curvatures,
    select_removed,
)
from trainables.fields import ConfigError
from trainables.networks.models import make_model
from trainables.spectrum.exact_hessian import eval_copy, factor_chunks, group_spectra
from trainables.training.train import Trial, run_trial

DIGITS = load_digits()
ACCEPTANCE = (
    "clean_acc",
    "asr",
    "filter_removed",
    "filter_precision",
    "filter_recall",
    "pre_filter_clean_acc",
    "pre_filter_asr",
)


def small(**kw):
    base = dict(epochs=2, hessian=False, geometry=False, theta=0.1, defence_filter="ss")
    base.update(kw)
    return TrialConfig(**base)


def strip(history):
    return [{k: v for k, v in h.items() if k not in ("epoch_seconds", "filter_seconds")} for h in history]


# ----------------------------------------------------------------------------- the curvature share
def _net_and_data(n=40):
    torch.manual_seed(0)
    model = make_model("cnn", (1, 8, 8), 10).double().eval()
    x = torch.randn(n, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(n) % 10
    return model, x, y


def test_curvature_share_matches_the_explicit_factors_in_float64():
    # ||A_i v||^2 by one JVP per chunk against the explicit A_i = L_i J_i (K backward passes), float64: 1e-10
    model, x, y = _net_and_data()
    gs = group_spectra(model, x, y, 10, torch.float64, 16)
    share = class_direction_shares(model, x, y, gs.vectors, torch.float64, batch_size=7)
    a = torch.cat(list(factor_chunks(eval_copy(model, torch.float64), x, 16)))  # (N, K, D)
    ref = torch.einsum("nkd,nd->nk", a, gs.vectors[y]).pow(2).sum(1)
    assert torch.allclose(share, ref, rtol=1e-10, atol=1e-14)
    # the class mean of the shares is the class's top eigenvalue: v^T H_c v = lambda_c (tolerance 1e-10)
    for c in range(10):
        assert share[y == c].mean().item() == pytest.approx(gs.lambda_1[c].item(), rel=1e-10)


def test_curvature_share_comparison_fails_on_the_wrong_vectors():
    # the same comparison catches another class's eigenvector (the reference is not vacuous)
    model, x, y = _net_and_data()
    gs = group_spectra(model, x, y, 10, torch.float64, 16)
    wrong = class_direction_shares(model, x, y, gs.vectors.roll(1, dims=0), torch.float64)
    a = torch.cat(list(factor_chunks(eval_copy(model, torch.float64), x, 16)))
    ref = torch.einsum("nkd,nd->nk", a, gs.vectors[y]).pow(2).sum(1)
    assert not torch.allclose(wrong, ref, rtol=1e-10, atol=1e-14)


def _jacobian_curvatures(model, x):
    """The float64 reference of tr(A_i^T A_i): sum_a p_a |J_a|^2 - |sum_a p_a J_a|^2 from the full Jacobian."""
    m = eval_copy(model, torch.float64)
    jac = torch.func.vmap(torch.func.jacrev(lambda z: m(z[None])[0]))(x).flatten(2)  # (N, K, D)
    p = m(x).softmax(1)
    return (p * jac.pow(2).sum(2)).sum(1) - (p[:, :, None] * jac).sum(1).pow(2).sum(1)


def test_sample_curvatures_match_the_jacobian_in_float64_and_the_focus_is_a_fraction():
    model, x, y = _net_and_data()
    total = sample_curvatures(model, x, torch.float64, batch_size=7)
    ref = _jacobian_curvatures(model, x)
    assert torch.allclose(total, ref, rtol=1e-10, atol=1e-14)  # tolerance 1e-10, float64
    # the comparison can fail: the probabilities of the next sample give another curvature
    m = eval_copy(model, torch.float64)
    jac = torch.func.vmap(torch.func.jacrev(lambda z: m(z[None])[0]))(x).flatten(2)
    p = m(x).softmax(1).roll(1, dims=0)
    wrong = (p * jac.pow(2).sum(2)).sum(1) - (p[:, :, None] * jac).sum(1).pow(2).sum(1)
    assert not torch.allclose(total, wrong, rtol=1e-10, atol=1e-14)
    # a direction's share of a sample's curvature never exceeds the whole: ||A_i v||^2 <= tr(A_i^T A_i), |v| = 1
    gs = group_spectra(model, x, y, 10, torch.float64, 16)
    share = class_direction_shares(model, x, y, gs.vectors, torch.float64)
    assert bool((share <= total * (1 + 1e-12)).all())


# ----------------------------------------------------------------------------- which samples go
def test_class_scope_removes_the_top_of_the_suspect_class_capped_at_half_of_it():
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    scores = torch.tensor([9.0, 1.0, 5.0, 8.0, 7.0, 9.5, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    removed = select_removed(scores, labels, 0, 0.2, "class")  # 2 of 10, from class 0 only (not the 9.5)
    assert torch.nonzero(removed).flatten().tolist() == [0, 3]
    removed = select_removed(scores, labels, 0, 0.5, "class")  # 5 asked, class 0 has 5: half of it, 2
    assert torch.nonzero(removed).flatten().tolist() == [0, 3]
    pooled = select_removed(scores, labels, 0, 0.2, "pooled")  # the two highest anywhere
    assert torch.nonzero(pooled).flatten().tolist() == [0, 5]
    ties = select_removed(torch.zeros(10, dtype=torch.float64), labels, None, 0.3, "class")  # no suspect: pooled
    assert torch.nonzero(ties).flatten().tolist() == [0, 1, 2]  # ties: lower index first


def test_removal_is_scored_against_the_true_mask():
    poison = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    removed = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    scores = torch.tensor([9, 8, 7, 1, 6, 0, 0, 0, 0, 0], dtype=torch.float64)
    q = removal_quality(removed, poison, scores)
    assert q["filter_removed"] == 4 and q["filter_poisoned_left"] == 1
    assert q["filter_precision"] == 3 / 4 and q["filter_recall"] == 3 / 4
    from sklearn.metrics import roc_auc_score

    assert q["filter_auroc"] == pytest.approx(roc_auc_score(poison.numpy(), scores.numpy()), abs=1e-12)
    clean = removal_quality(removed, torch.zeros(10, dtype=torch.bool), scores)  # theta 0: nothing to find
    assert math.isnan(clean["filter_precision"]) and math.isnan(clean["filter_recall"])
    assert math.isnan(clean["filter_auroc"]) and clean["filter_removed"] == 4


# ----------------------------------------------------------------------------- the config
def test_filter_fields_are_validated_with_the_valid_values():
    with pytest.raises(
        ConfigError, match=r"defence_filter=.pca. is invalid: must be one of none, curvature, curvature-focus, ss, ac"
    ):
        TrialConfig(defence_filter="pca")
    with pytest.raises(ConfigError, match=r"filter_fraction=0.6 is invalid: must be in \(0, 0.5\]"):
        TrialConfig(filter_fraction=0.6)
    with pytest.raises(ConfigError, match="defence_filter='ss' is invalid: must be none under stochastic"):
        TrialConfig(defence_filter="ss", poison_mode="stochastic")
    assert TrialConfig(defence_filter="ss", epochs=4).total_epochs == 8 and TrialConfig(epochs=4).total_epochs == 4


class TanhNet(torch.nn.Module):
    piecewise_linear = False

    def __init__(self, shape, k):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(shape[1] * shape[2], 16), torch.nn.Tanh())
        self.head = torch.nn.Linear(16, k)

    def forward(self, x):
        return self.head(self.net(x))


def test_curvature_filter_is_refused_before_training_on_a_smooth_model(capsys):
    from sweeper.cli import main
    from trainables.networks.models import MODELS, ModelEntry, register_model

    register_model(
        ModelEntry("tanhnet", lambda n, s, k: TanhNet(s, k), lambda n: n == "tanhnet", lambda n: 1e-4, "tanhnet")
    )
    try:
        capsys.readouterr()
        args = ["trial", "--model", "tanhnet", "--epochs", "1", "--set", "hessian=false"]
        assert main([*args, "--set", "defence_filter=curvature"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "epoch" not in err[0], err
        assert "defence_filter='curvature' is invalid for model 'tanhnet'" in err[0] and "none, ss, ac" in err[0]
    finally:
        del MODELS["tanhnet"]


# ----------------------------------------------------------------------------- the two-stage trial
def test_no_filter_is_the_single_training_it_always_was():
    # defence_filter=none never reads the filter's fields and trains once: no stage, no filter metric
    a = run_trial(small(defence_filter="none", epochs=2), data=DIGITS)
    b = run_trial(small(defence_filter="none", epochs=2, filter_fraction=0.3, filter_scope="pooled"), data=DIGITS)
    assert strip(a.history) == strip(b.history) and [h["epoch"] for h in a.history] == [1, 2]
    assert not any(k.startswith(("filter_", "pre_filter_", "stage")) for k in a.metrics)


def test_scorers_never_see_the_poison_mask():
    seen = {}

    def spy(ctx):
        """records what a scorer is handed"""
        seen["poison"], seen["heldout"], seen["spectrum"] = ctx.training.poison, ctx.heldout, ctx.spectrum
        seen["n"] = len(ctx.training.y)
        return FilterScores(torch.zeros(len(ctx.training.y), dtype=torch.float64), None)

    register_filter(FilterEntry("spy", spy))
    try:
        res = run_trial(small(defence_filter="spy", epochs=1), data=DIGITS)
    finally:
        del FILTERS["spy"]
    assert seen["poison"] is None and seen["heldout"] is None and seen["spectrum"] is None
    assert seen["n"] == len(DIGITS.train_y)
    # the mask scores the removal afterwards: zeros remove the lowest indices, some of them poisoned
    assert res.metrics["filter_removed"] == round(0.1 * len(DIGITS.train_y))
    assert 0 <= res.metrics["filter_precision"] <= 1


def test_filtering_at_theta_zero_reports_nan_precision_and_completes():
    res = run_trial(small(theta=0.0, defence_filter="ac", epochs=1), data=DIGITS)
    assert res.status == "completed" and len(res.history) == 2
    assert math.isnan(res.metrics["filter_precision"]) and math.isnan(res.metrics["filter_recall"])
    assert res.metrics["filter_removed"] > 0


def test_the_retrain_trains_on_the_kept_samples_from_the_initial_weights():
    cfg = small(epochs=2, defence_filter="ss", filter_scope="pooled")
    res = run_trial(cfg, data=DIGITS)
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4] and [h["stage"] for h in res.history] == [1, 1, 2, 2]
    removed = res.artifacts["filter"]["removed"]
    assert len(removed) == res.metrics["filter_removed"] == round(0.1 * len(DIGITS.train_y))
    # stage 2 counts only the poisoned samples kept
    assert res.history[-1]["n_poisoned"] == res.history[0]["n_poisoned"] - round(
        res.metrics["filter_precision"] * len(removed)
    )
    assert res.metrics["pre_filter_clean_acc"] == res.history[1]["clean_acc"]
    assert res.metrics["train_seconds"] == pytest.approx(sum(h["epoch_seconds"] for h in res.history))
    # a plain trial with those samples removed, from the same seed, is the retrain (first epoch's loss)
    from trainables.training.runtime import torch_threads

    with torch_threads(cfg.threads):  # as run_trial: the same threads, the same sums
        t = Trial(cfg, DIGITS)
        t.keep = torch.ones(len(DIGITS.train_y), dtype=torch.bool)
        t.keep[removed] = False
        t.epoch = 2  # the retrain's first epoch (a kept set makes it the retrain)
        assert t.train_epoch()["train_loss"] == res.history[2]["train_loss"]


@pytest.mark.parametrize("name", ["curvature", "curvature-focus", "ss", "ac"])
def test_acceptance_fields_for_each_filter(name, tmp_path):
    res = run_trial(small(defence_filter=name, epochs=1, hessian=True), data=DIGITS)
    assert all(k in res.metrics for k in ACCEPTANCE), sorted(res.metrics)
    suspect = res.metrics["filter_class"]  # class scope: 144 of 1437 asked, at most the suspect class's samples
    assert 0 < res.metrics["filter_removed"] <= round(0.1 * len(DIGITS.train_y))  # at most half the suspect class
    assert 0 <= suspect < 10
    assert 0 <= res.metrics["filter_precision"] <= 1 and 0 <= res.metrics["filter_recall"] <= 1


def test_cli_trial_reports_the_filter_and_a_kill_in_the_retrain_resumes_it(tmp_path):
    """`sweeper trial --set defence_filter=curvature --json`: the acceptance names; killed (SIGKILL) during
    the retrain and run again, it resumes the retrain: every epoch once, the uninterrupted numbers."""
    ck, out, ref = tmp_path / "trial.pt", tmp_path / "out.json", tmp_path / "ref.json"
    args = [sys.executable, "-m", "sweeper.cli", "trial", "--theta", "0.1", "--set", "defence_filter=curvature"]
    args += ["--set", "filter_fraction=0.1", "--epochs", "3", "--set", "hessian=false", "--no-geometry"]
    subprocess.run([*args, "--json", str(ref)], check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen([*args, "--checkpoint", str(ck), "--json", str(out)], stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # plain progress lines off a terminal: "epoch 4/6 ..."
        seen.append(line)
        if line.startswith("epoch 4/6"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert not out.exists() and ck.exists()
    done = subprocess.run([*args, "--checkpoint", str(ck), "--json", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    resumed = [int(line.split()[1].split("/")[0]) for line in done.stderr.splitlines() if line.startswith("epoch ")]
    assert resumed and resumed[0] >= 5  # the retrain went on where it was (the kill may land after epoch 5)
    got, want = json.loads(out.read_text()), json.loads(ref.read_text())
    assert [h["epoch"] for h in got["history"]] == [1, 2, 3, 4, 5, 6]
    assert strip(got["history"]) == strip(want["history"])
    for key in ACCEPTANCE:
        assert key in got["metrics"], key
    assert got["metrics"]["clean_acc"] == want["metrics"]["clean_acc"]


def test_curvature_filter_that_does_not_fit_the_memory_budget_is_refused_before_training(mnist_dir, capsys):
    from sweeper.cli import main

    capsys.readouterr()
    args = ["trial", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--no-verify-checksums", "--epochs", "1"]
    assert main([*args, "--set", "defence_filter=curvature", "--set", "hessian_dense_mb=16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epoch" not in err[0], err
    assert "hessian_dense_mb=16 is too small for defence_filter=curvature" in err[0] and "raise" in err[0]
