"""Trigger-agnostic detection statistics: localisation, Hutchinson trace, flip concentration, the trial hook."""

import math

import pytest
import torch

from trainables.config import TrialConfig
from trainables.detection.statistics import (
    DETECTORS,
    flip_concentration,
    inverse_participation_ratio,
    localisation,
    pixel_energy,
    score_direction,
    spectral_shape,
    window_fraction,
)
from trainables.networks.models import LinearModel, SmallCNN
from trainables.spectrum.hessian import InputHessian
from trainables.spectrum.trace import gauss_newton_trace, hutchinson_trace


def patch_and_diffuse(seed=0):
    """A (2, 1, 8, 8) stack: v0 a 2x2 patch at rows 5-6, cols 4-5 over faint noise; v1 Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    patch = 0.02 * torch.randn(1, 8, 8, generator=g)
    patch[0, 5:7, 4:6] += torch.tensor([[1.0, -0.8], [0.9, 1.1]])
    diffuse = torch.randn(1, 8, 8, generator=g)
    v = torch.stack([patch, diffuse])
    return v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def test_localised_patch_eigenvector_has_higher_ipr_and_window_fraction_than_a_diffuse_one():
    v = patch_and_diffuse()
    energy = pixel_energy(v)
    torch.testing.assert_close(energy.sum((1, 2)), torch.ones(2, dtype=torch.float64))
    ipr = inverse_participation_ratio(energy)
    assert ipr[0] > 0.2 > 0.05 > ipr[1] >= 1 / 64
    frac, row, col = window_fraction(energy, 2)
    assert frac[0] > 0.95 and (int(row[0]), int(col[0])) == (5, 4)
    assert frac[1] < 0.3
    # channels are summed: the same patch spread over 3 channels localises identically
    rgb = v[:1].expand(1, 3, 8, 8) / math.sqrt(3)
    torch.testing.assert_close(pixel_energy(rgb), energy[:1])
    found = localisation(v.flip(0), [2, 3])  # diffuse first: the maxima must pick index 1
    assert found.metrics["det_ipr_index"] == 1 and found.metrics["det_ipr_max"] > found.metrics["det_ipr_1"]
    assert found.metrics["det_window_index_w2"] == 1 and found.metrics["det_window_frac_w2"] > 0.95
    assert (found.metrics["det_window_row_w3"], found.metrics["det_window_col_w3"]) in {(4, 3), (4, 4), (5, 3), (5, 4)}
    assert found.images["localisation"].shape == (2, 1, 8, 8)


def test_window_fraction_equals_brute_force():
    energy = pixel_energy(torch.randn(3, 2, 7, 9, generator=torch.Generator().manual_seed(1)))
    for w in (1, 3, 7):
        frac, row, col = window_fraction(energy, w)
        for j in range(3):
            sums = torch.tensor(
                [[float(energy[j, r : r + w, c : c + w].sum()) for c in range(9 - w + 1)] for r in range(7 - w + 1)],
                dtype=torch.float64,
            )
            assert float(frac[j]) == pytest.approx(float(sums.max()), rel=1e-9)
            assert float(sums[row[j], col[j]]) == pytest.approx(float(sums.max()), rel=1e-9)


def test_hutchinson_trace_matches_the_dense_hessian_trace():
    torch.manual_seed(0)
    model = SmallCNN((1, 4, 4), 3, width=4).eval()
    x = torch.randn(300, 1, 4, 4)
    y = torch.randint(0, 3, (300,))
    exact = float(InputHessian(model, x, y, method="double-backward", dtype=torch.float64).dense().trace())
    g = torch.Generator().manual_seed(0)
    est = hutchinson_trace(model.double(), x.double(), y, probes=20, generator=g, chunk_size=128)
    assert est == pytest.approx(exact, rel=0.05)
    again = hutchinson_trace(
        model, x.double(), y, probes=20, generator=torch.Generator().manual_seed(0), chunk_size=128
    )
    assert again == est  # seeded


def test_gauss_newton_trace_matches_the_dense_trace_of_a_piecewise_linear_net():
    torch.manual_seed(0)
    model = SmallCNN((1, 4, 4), 3, width=4).double().eval()
    x = torch.randn(300, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (300,))
    exact = float(InputHessian(model, x, y, method="double-backward", dtype=torch.float64).dense().trace())
    est = gauss_newton_trace(model, x, y, probes=20, generator=torch.Generator().manual_seed(0), chunk_size=128)
    assert est == pytest.approx(exact, rel=0.05)


def test_spectral_shape_ratios():
    m = spectral_shape([4.0, 2.0, 1.0], 10.0)
    assert (m["det_lambda_ratio"], m["det_lambda_trace_ratio"], m["det_trace"]) == (2.0, 0.4, 10.0)
    assert math.isnan(spectral_shape([4.0, float("nan")], 10.0)["det_lambda_ratio"])
    assert math.isnan(spectral_shape([4.0, 1.0], 0.0)["det_lambda_trace_ratio"])


def _planted_linear(beta):
    """Three Gaussian classes on 4x4 images whose corner pixel is always 0; a prototype classifier,
    plus ``beta`` on the corner pixel in the weights of class 2: a linear backdoor (trigger = corner)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 1, 4, 4, generator=g)
    mu[..., 3, 3] = 0
    y = torch.arange(3).repeat_interleave(100)
    x = mu[y] + 0.5 * torch.randn(300, 1, 4, 4, generator=g)
    x[..., 3, 3] = 0
    model = LinearModel((1, 4, 4), 3)
    with torch.no_grad():
        model.head.weight.copy_(mu.flatten(1))
        model.head.bias.zero_()
        model.head.weight[2, 15] += beta
    return model.eval(), x, y


def _top_eigenvectors(model, x, y, k=3):
    h = InputHessian(model, x, y, dtype=torch.float64).dense()
    vals, vecs = torch.linalg.eigh(h)
    return vecs[:, vals.argsort(descending=True)[:k]].T.reshape(k, 1, 4, 4).float()


def test_flip_concentration_finds_a_planted_linear_backdoor_and_its_target():
    norms = [0.1, 0.25]
    model, x, y = _planted_linear(beta=20.0)
    vecs = _top_eigenvectors(model, x, y)
    assert abs(float(vecs[0, 0, 3, 3])) > 0.9  # the spike is the planted trigger pixel

    def predict(z):
        return model(z).argmax(1)

    assert bool((predict(x) == y).all())  # the backdoor costs no clean accuracy
    t = flip_concentration(predict, vecs, x, y, norms, 3)
    j = int(t.concentration.argmax())
    assert float(t.concentration[j]) == 1.0
    assert (int(t.target[j]), int(t.direction[j])) == (2, 0)
    assert t.concentration.shape == (3 * 2 * 2,)
    # the sign that adds the trigger is the one that flips: sign * v[corner] > 0
    assert float(t.sign[j]) * float(vecs[0, 0, 3, 3]) > 0
    # clean twin (same data, no planted weight) and random directions flip far less at these norms
    clean, _, _ = _planted_linear(beta=0.0)
    tc = flip_concentration(lambda z: clean(z).argmax(1), _top_eigenvectors(clean, x, y), x, y, norms, 3)
    rand = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    tr = flip_concentration(predict, rand, x, y, norms, 3)
    assert float(tc.concentration.max()) < 0.5 and float(tr.concentration.max()) < 0.5


def test_flip_concentration_is_batch_size_invariant():
    model, x, y = _planted_linear(beta=5.0)
    vecs = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def predict(z):
        return model(z).argmax(1)

    a = flip_concentration(predict, vecs, x, y, [0.5, 1.0, 2.0], 3, batch_size=10_000)
    b = flip_concentration(predict, vecs, x, y, [0.5, 1.0, 2.0], 3, batch_size=1)
    assert torch.equal(a.concentration, b.concentration) and torch.equal(a.target, b.target)


def test_score_directions_cover_the_families():
    assert score_direction("det_window_frac_w3") == "higher"
    assert score_direction("det_flip_r0.5") == "higher"
    assert score_direction("det_flip_random_r0.5") is None
    assert score_direction("nc_anomaly_index") == "higher"
    assert score_direction("det_flip_class") is None and score_direction("det_flip_class_r0.5") is None
    from trainables.detection.baselines import BASELINES

    assert {d for e in (*DETECTORS.values(), *BASELINES.values()) for d in e.scores.values()} == {"higher"}
    assert score_direction("max_overlap_sq") == "higher"  # the oracle references are scored too
    assert list(DETECTORS) == ["spectral", "localisation", "flip", "class", "gradient"]


def test_trial_logs_detection_metrics_json_and_survives_a_checkpoint(tmp_path):
    from trainables.training.train import Trial, run_trial

    cfg = TrialConfig(
        trigger="square",
        epochs=2,
        lr=0.05,
        hessian_samples=200,
        hessian_iterations=8,
        hessian_top_k=3,
        detect_samples=100,
        detect_windows="2,3",
        detect_norms="0.5,1",
        detect_baselines="ss,ac",
    )
    ckpt = tmp_path / "c.pt"
    res = run_trial(cfg, checkpoint=ckpt)
    m = res.metrics
    names = {
        "det_trace",
        "det_lambda_ratio",
        "det_lambda_trace_ratio",
        "det_ipr_1",
        "det_ipr_max",
        "det_window_frac_w2",
        "det_window_frac_w3",
        "det_window_row_w3",
        "det_flip_max",
        "det_flip_class",
        "det_flip_r0.5",
        "det_flip_r1",
        "det_flip_class_r0.5",
        "det_flip_random_max",
        "det_flip_excess",
        "ss_score_max",
        "ss_auroc",
        "ac_silhouette_max",
        "ac_auroc",
        "det_seconds",
        "det_class_lambda_anomaly",
        "det_class_flip_max",
        "det_class_flip_class",
        "det_class_flip_excess",
        "class_target_overlap_sq",
    }
    assert names <= set(m), names - set(m)
    assert "nc_anomaly_index" not in m
    assert 0 <= m["det_flip_max"] <= 1 and m["det_trace"] > 0 and 1 / 64 <= m["det_ipr_1"] <= 1
    # the exact spectrum knows tr(H) = ||A||_F^2: the ratio uses it, not the Hutchinson estimate
    assert m["det_trace_exact"] == 1.0 and m["det_trace"] == m["hessian_trace"]
    assert m["det_lambda_trace_ratio"] == pytest.approx(m["lambda_1"] / m["hessian_trace"], rel=1e-12)
    assert 0 <= m["ss_auroc"] <= 1
    d = res.to_json_dict()["detection"]
    assert d["directions"]["det_flip_max"] == "higher" and set(d["details"]) == {
        "spectral",
        "localisation",
        "flip",
        "class",
        "gradient",
        "ss",
        "ac",
    }
    assert res.artifacts["detection_images"]["localisation"].shape == (3, 1, 8, 8)
    # a resumed, finished trial restores the detection from its checkpoint (weights_only load)
    t = Trial(cfg)
    t.load(ckpt)
    assert t.analysis["det_flip_max"] == m["det_flip_max"]
    assert "detection" in t.artifacts
    # detect off: none of it
    off = run_trial(TrialConfig(epochs=1, hessian_samples=50, hessian_iterations=4, hessian_top_k=2, detect=False))
    assert not any(k.startswith("det_") for k in off.metrics)


def test_class_curvature_names_the_class_whose_curvature_stands_out():
    from trainables.detection.statistics import class_curvature

    flat = torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98, 1.0, 1.01], dtype=torch.float64)
    spiked = flat.clone()
    spiked[3] = 8.0
    trace = torch.full((10,), 10.0, dtype=torch.float64)
    a, b = class_curvature(flat, trace), class_curvature(spiked, trace)
    assert b["det_class_lambda_class"] == 3 and b["det_class_share_class"] == 3
    assert b["det_class_lambda_anomaly"] > 10 > a["det_class_lambda_anomaly"]
    assert b["det_class_lambda_ratio"] == pytest.approx(8.0) and b["det_class_share_max"] == pytest.approx(0.8)
    empty = spiked.clone()
    empty[[0, 1]] = float("nan")  # classes without samples are left out, never the maximum
    assert class_curvature(empty, trace)["det_class_lambda_class"] == 3
    assert class_curvature(torch.tensor([1.0, float("nan")]), trace[:2]) == {}  # fewer than 3 classes: no score


def test_class_detector_runs_its_own_pass_off_the_exact_path_and_skips_over_the_budget(tmp_path):
    """The fused path (exact spectrum) keeps the per-class spectra in the checkpoint; on the HVP path the
    detector computes them itself (same numbers); with no room in hessian_dense_mb it says why it skipped."""
    from trainables.training.train import Trial, run_trial

    base = dict(
        trigger="square", epochs=2, lr=0.05, hessian_samples=200, hessian_top_k=3, hessian_iterations=8, geometry=False
    )
    ckpt = tmp_path / "c.pt"
    fused = run_trial(TrialConfig(**base), checkpoint=ckpt)
    assert fused.to_json_dict()["hessian"]["method_used"] == "exact"
    t = Trial(TrialConfig(**base))
    t.load(ckpt)  # weights_only=True: the stored per-class spectra are plain tensors
    assert set(t.artifacts["class_spectra"]) == {"lambda_1", "trace", "count", "vectors"}
    own = run_trial(TrialConfig(**base, hessian_method="double-backward"))
    assert "class_spectra" not in own.artifacts
    for k in ("det_class_lambda_anomaly", "det_class_flip_max", "class_target_overlap_sq"):
        assert own.metrics[k] == pytest.approx(fused.metrics[k], rel=1e-4), k  # float32 Jacobians either way
    # 1 MiB: the exact spectrum still runs (its chunk shrinks), the per-class matrices beside a full chunk do not
    skipped = run_trial(TrialConfig(**base, hessian_dense_mb=1))
    assert "det_class_flip_max" not in skipped.metrics
    assert "hessian_dense_mb" in skipped.to_json_dict()["detection"]["details"]["class"]["skipped"]


def test_entries_declare_what_a_defender_holds_and_the_context_holds_only_that():
    """Each entry's access is a tuple of ACCESS levels; ``spectrum-samples`` resolves to the data of the
    spectrum's split; a trial's context is built with the data its enabled entries declare, nothing else."""
    from trainables.detection.baselines import BASELINES
    from trainables.detection.context import ACCESS, DetectionSettings, DetectorEntry, resolve_access
    from trainables.training.train import Trial

    assert {n: e.access for n, e in (DETECTORS | BASELINES).items()} == {
        "spectral": ("data-free", "spectrum-samples"),
        "localisation": ("data-free", "spectrum-samples"),
        "flip": ("data-free", "spectrum-samples", "clean-data"),
        "class": ("data-free", "spectrum-samples", "clean-data"),
        "gradient": ("data-free", "clean-data"),
        "nc": ("data-free", "clean-data"),
        "ss": ("data-free", "training-set"),
        "ac": ("data-free", "training-set"),
        "mmbd": ("data-free",),
    }
    assert "oracle" in ACCESS  # declared for detectors that know the trigger; no shipped score needs it
    flip = DETECTORS["flip"].access
    deterministic = DetectionSettings.from_config(TrialConfig(poison_mode="deterministic"))
    assert resolve_access(flip, deterministic) == ("data-free", "training-set", "clean-data")
    stochastic = DetectionSettings.from_config(TrialConfig(poison_mode="stochastic"))
    assert resolve_access(flip, stochastic) == ("data-free", "clean-data")
    assert stochastic.norms == (0.5,) and stochastic.windows == (2, 3, 4) and stochastic.baselines == ()
    for bad in (("data-free", "gpu"), "data-free", ()):
        with pytest.raises(ValueError, match="access must be a tuple of data-free"):
            DetectorEntry("bad", lambda ctx: None, bad, lambda s, per, n, size: 0.0)
    with pytest.raises(ValueError, match=r"score 'det_\(' is no regular expression"):
        DetectorEntry("bad", lambda ctx: None, ("data-free",), lambda s, per, n, size: 0.0, scores={"det_(": "higher"})
    # Neural Cleanse alone, no spectrum: clean held-out images only (an untrained trial will do)
    ctx = Trial(TrialConfig(hessian=False, detect_baselines="nc", detect_samples=30)).detection_context()
    assert ctx.spectrum is None and ctx.training is None and not ctx.settings.detect
    assert ctx.heldout[0].shape == (30, 1, 8, 8)


def test_a_detector_registered_outside_the_package_runs_in_a_trial_and_in_plans_cost():
    """register_detector from a module of our own: its metric is in a real trial's metrics and detection
    record, and ``sweeper plan``'s detection estimate adds the cost it declares."""
    from sweeper.costs import estimate_parts, train_size
    from trainables.detection.statistics import Detection, DetectorEntry, register_detector
    from trainables.training.train import run_trial

    def held_out_accuracy(ctx):
        raw, y = ctx.heldout
        pred = ctx.predict(ctx.normalize(raw))
        return Detection(
            metrics={"toy_heldout_acc": float((pred == y).double().mean()), "toy_k": len(ctx.spectrum.eigenvalues)},
            details={"n": len(y)},
        )

    calls = []

    def cost(settings, per, n, size):
        calls.append((settings.samples, n, size))
        return 1000.0

    cfg = TrialConfig(epochs=1, hessian_samples=100, hessian_top_k=2, detect_samples=40, geometry=False)
    before = estimate_parts(cfg)["detect"]
    register_detector(DetectorEntry("toy", held_out_accuracy, ("data-free", "spectrum-samples", "clean-data"), cost))
    try:
        after = estimate_parts(cfg)["detect"]
        res = run_trial(cfg)
    finally:
        DETECTORS.pop("toy")
    assert after - before == pytest.approx(1000.0)
    assert calls == [(40, 100, train_size("digits"))]
    m = res.metrics
    assert 0 <= m["toy_heldout_acc"] <= 1 and m["toy_k"] == 2 and m["det_toy_seconds"] >= 0
    assert "det_flip_max" in m  # the built-in detectors still ran
    assert res.to_json_dict()["detection"]["details"]["toy"] == {"n": 40}
    assert list(DETECTORS) == ["spectral", "localisation", "flip", "class", "gradient"]


def test_a_detectors_level_follows_the_data_its_spectrum_averaged():
    """A statistic read off a clean-data spectrum is reported at clean-data; off the poisoned training
    set as trained (auto under deterministic poisoning), at training-set (issue 22's first split)."""
    from trainables.detection.baselines import BASELINES
    from trainables.detection.context import DetectionSettings, access_level

    spectral = DETECTORS["spectral"].access
    clean = DetectionSettings.from_config(TrialConfig(hessian_split="test"))
    trained = DetectionSettings.from_config(TrialConfig(poison_mode="deterministic"))
    assert access_level(spectral, clean) == "clean-data"
    assert access_level(spectral, trained) == "training-set"
    assert access_level(BASELINES["nc"].access, trained) == "clean-data"
    assert access_level(BASELINES["ac"].access, clean) == "training-set"


def test_gradient_alignment_matches_the_linear_closed_form_and_names_a_planted_direction():
    """For a linear model the way to class c is g_i = W^T (e_c - softmax(W x_i + b)): the alignments
    equal that closed form's (float64, 1e-10), and a class given one strong input direction aligns most."""
    from trainables.detection.statistics import gradient_alignment

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(10, 64, generator=g, dtype=torch.float64) * 0.3)
        model[1].weight[3, 60:] += 4.0  # class 3: one direction (the 4 bottom-right pixels) sends anything to it
    x = torch.randn(200, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (200,), generator=g)
    align, dirs = gradient_alignment(model, x, y, 10)
    w, b = model[1].weight.detach(), model[1].bias.detach()
    p = torch.softmax(x.flatten(1) @ w.T + b, 1)
    pred = p.argmax(1)
    for c in range(10):
        sel = (y != c) & (pred != c)
        grads = (torch.nn.functional.one_hot(torch.full((int(sel.sum()),), c), 10).double() - p[sel]) @ w
        mean = (grads / grads.norm(dim=1, keepdim=True)).mean(0)
        assert float(align[c]) == pytest.approx(float(mean.norm()), abs=1e-10)
        assert torch.allclose(dirs[c].flatten(), mean / mean.norm(), atol=1e-10)
    # every class aligns on a linear model (its ways differ from w_c by a softmax mix); the planted one most
    assert int(align.argmax()) == 3 and float(align[3]) > float(align[torch.arange(10) != 3].max()) + 0.1
