"""Input-Hessian operator, Lanczos and overlaps against dense float64 references."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, vmap

from trainables.config import TrialConfig
from trainables.data import load_digits
from trainables.hessian import InputHessian, listing7_overlap, spectrum_metrics, top_eigenpairs
from trainables.train import Trial, run_trial

DIGITS = load_digits()


@pytest.fixture(scope="module")
def trained():
    trial = Trial(TrialConfig(epochs=2, theta=0.1, hessian=False, geometry=False), DIGITS)
    while not trial.done:
        trial.train_epoch()
    x = DIGITS.normalize(DIGITS.train_x[:40])
    y = DIGITS.train_y[:40]
    return trial.model, x, y


def dense_reference(model, x, y):
    """Mean of per-sample float64 Hessians from torch.func.hessian."""
    m = InputHessian(model, x, y, dtype=torch.float64).model  # eval-mode float64 copy

    def loss(xi, yi):
        return F.cross_entropy(m(xi[None]), yi[None])

    per = vmap(hessian(loss))(x.double(), y)
    d = x[0].numel()
    return per.reshape(len(y), d, d).mean(0)


@pytest.mark.parametrize("method", ["double-backward", "gauss-newton"])
def test_operator_equals_dense_float64_reference(trained, method):
    model, x, y = trained
    ref = dense_reference(model, x, y)
    op = InputHessian(model, x, y, chunk_size=16, method=method, dtype=torch.float64)
    assert op.shape == (64, 64) and op.dtype == torch.float64 and op.device == x.device
    g = torch.Generator().manual_seed(0)
    v = torch.randn(64, 3, generator=g, dtype=torch.float64)
    out = op @ v
    assert out.shape == (64, 3)
    for j in range(3):
        rel = float((out[:, j] - ref @ v[:, j]).norm() / (ref @ v[:, j]).norm())
        assert rel < 1e-6, rel
    torch.testing.assert_close(op @ v[:, 0], out[:, 0], rtol=1e-12, atol=0)  # vector form = matrix form


def test_float32_operator_is_good_to_the_fp32_floor(trained):
    model, x, y = trained
    ref = dense_reference(model, x, y)
    v = torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = InputHessian(model, x, y, method="gauss-newton") @ v.float()
    assert float((out.double() - ref @ v).norm() / (ref @ v).norm()) < 1e-3


def test_chunking_does_not_change_the_product(trained):
    model, x, y = trained
    v = torch.randn(64, dtype=torch.float64)
    a = InputHessian(model, x, y, chunk_size=7, dtype=torch.float64) @ v
    b = InputHessian(model, x, y, chunk_size=1000, dtype=torch.float64) @ v
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-18)


def test_lanczos_top5_matches_eigh_of_the_dense_matrix(trained):
    model, x, y = trained
    ref = dense_reference(model, x, y)
    evals, evecs = torch.linalg.eigh(ref)
    evals, evecs = evals.flip(0)[:5], evecs.flip(1)[:, :5]
    op = InputHessian(model, x, y, method="gauss-newton", dtype=torch.float64)
    spec = top_eigenpairs(op, k=5, iterations=40, seed=0)
    torch.testing.assert_close(spec.eigenvalues, evals, rtol=1e-4, atol=0)
    cos = (spec.eigenvectors * evecs).sum(0).abs()
    assert bool((cos >= 0.999).all()), cos


def test_indefinite_operator_keeps_its_sign():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.tensor([-9.0, 4.0, 3.0, -2.5, 2.0, 1.5], dtype=torch.float64),
                     torch.linspace(-1, 1, 44, dtype=torch.float64)])
    a = q @ torch.diag(lam) @ q.T
    spec = top_eigenpairs(a, k=5, iterations=50)
    torch.testing.assert_close(spec.eigenvalues, torch.tensor([4.0, 3.0, 2.0, 1.5, 1.0], dtype=torch.float64),
                               rtol=1e-8, atol=1e-8)
    neg = top_eigenpairs(-torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64)), k=3, iterations=20)
    torch.testing.assert_close(neg.eigenvalues, torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64))


def test_scaling_rescues_tiny_operators_and_unscaled_lanczos_fails():
    """lambda_1 ~ 2e-6: linear_operator's absolute |beta| < 1e-6 stop ruins the unscaled run."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    lam = 2e-6 * torch.logspace(0, -4, 200, dtype=torch.float64)
    a = q @ torch.diag(lam) @ q.T
    truth = lam[:5]
    scaled = top_eigenpairs(a, k=5, iterations=60)
    torch.testing.assert_close(scaled.eigenvalues, truth, rtol=1e-4, atol=0)
    unscaled = top_eigenpairs(a, k=5, iterations=60, probes=0)  # no norm estimate: scale 1
    assert unscaled.iterations < 10
    assert not torch.allclose(unscaled.eigenvalues.nan_to_num(0.0), truth, rtol=1e-4, atol=0)


def test_gauss_newton_is_wrong_for_smooth_activations():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 5))
    x, y = torch.randn(10, 1, 4, 4), torch.randint(0, 5, (10,))
    v = torch.randn(16, dtype=torch.float64)
    db = InputHessian(net, x, y, dtype=torch.float64) @ v
    gn = InputHessian(net, x, y, method="gauss-newton", dtype=torch.float64) @ v
    assert float((db - gn).norm() / db.norm()) > 1e-2


def test_listing7_overlap_is_one_for_the_trigger_and_zero_for_orthogonal():
    trig = Trial(TrialConfig(epochs=1, hessian=False, geometry=False), DIGITS).direction
    assert listing7_overlap(trig, trig) == pytest.approx(1.0, abs=1e-6)
    assert listing7_overlap(-3.0 * trig, trig) == pytest.approx(-1.0, abs=1e-6)
    other = torch.randn(trig.shape, generator=torch.Generator().manual_seed(0))
    other = other - other.mean()
    t = trig - trig.mean()
    other = other - (other * t).sum() / (t * t).sum() * t  # orthogonal to the trigger, still zero-mean
    assert listing7_overlap(other, trig) == pytest.approx(0.0, abs=1e-6)


def test_spectrum_metrics_follow_table_2():
    from trainables.hessian import Spectrum

    d = torch.zeros(4)
    d[0] = 1.0
    vecs = torch.eye(4)[:, [1, 0, 2]]  # the trigger-aligned vector is the second
    vecs[:, 1] *= -1  # sign is arbitrary
    metrics, fixed, overlaps = spectrum_metrics(Spectrum(torch.tensor([3.0, 2.0, 1.0]), vecs, 3, 1.0), d)
    assert metrics["lambda_1"] == 3.0 and metrics["eig_gap"] == 1.0
    assert metrics["max_overlap_index"] == 1 and metrics["max_overlap_sq"] == pytest.approx(1.0)
    assert overlaps[1] > 0 and fixed[0, 1] > 0


def test_trial_reports_spectrum_and_resumes_identically(tmp_path):
    cfg = TrialConfig(epochs=3, theta=0.1, hessian_samples=200, hessian_iterations=12, spectrum_every=1)
    full = run_trial(cfg, data=DIGITS)
    for key in ("lambda_1", "lambda_5", "eig_gap", "overlap", "overlap_sq", "max_overlap_sq",
                "max_overlap_index", "geom_d_ratio", "geom_sigma_ratio"):
        assert key in full.metrics, key
    assert "lambda_1" in full.history[0] and "max_overlap_sq" in full.history[1]  # onset tracking
    assert full.artifacts["eigenvectors"].shape == (5, 1, 8, 8)
    assert len(full.artifacts["geometry"]) == 10
    ck = tmp_path / "t.pt"
    run_trial(cfg, checkpoint=ck, data=DIGITS, max_epochs=2)
    resumed = run_trial(cfg, checkpoint=ck, data=DIGITS)
    strip = lambda h: [{k: v for k, v in e.items() if not k.endswith("seconds")} for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    for key in ("lambda_1", "max_overlap_sq", "geom_d_ratio"):
        assert resumed.metrics[key] == full.metrics[key]
