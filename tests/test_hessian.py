"""Input-Hessian operator, Lanczos and overlaps against dense float64 references."""

import json

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
    lam = torch.cat(
        [
            torch.tensor([-9.0, 4.0, 3.0, -2.5, 2.0, 1.5], dtype=torch.float64),
            torch.linspace(-1, 1, 44, dtype=torch.float64),
        ]
    )
    a = q @ torch.diag(lam) @ q.T
    spec = top_eigenpairs(a, k=5, iterations=50)
    torch.testing.assert_close(
        spec.eigenvalues, torch.tensor([4.0, 3.0, 2.0, 1.5, 1.0], dtype=torch.float64), rtol=1e-8, atol=1e-8
    )
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
    for key in (
        "lambda_1",
        "lambda_5",
        "eig_gap",
        "overlap",
        "overlap_sq",
        "max_overlap_sq",
        "max_overlap_index",
        "geom_d_ratio",
        "geom_sigma_ratio",
    ):
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


# ---------------------------------------------------------------------------- the spectrum engine (issue 9)
from trainables.config import SweeperError  # noqa: E402
from trainables.hessian import (  # noqa: E402
    GramOperator,
    HessianMethodError,
    SampleFactors,
    ce_hessian_factor,
    converged_eigenpairs,
    eval_copy,
    factor_chunks,
    input_hessian_spectrum,
    plan_spectrum,
    subset_spectrum,
)
from trainables.models import PreResNet, SmallCNN  # noqa: E402

EXACT_RTOL = 1e-10  # float64 exact path vs dense float64 torch.func.hessian (we see ~1e-15)


def per_sample_hessians(model, x, y):
    """(N, D, D) float64 per-sample input Hessians of the CE, by torch.func (second derivatives included)."""
    m = eval_copy(model, torch.float64)

    def loss(xi, yi):
        return F.cross_entropy(m(xi[None]), yi[None])

    d = x[0].numel()
    return vmap(hessian(loss))(x.double(), y).reshape(len(y), d, d)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def bn_net_trained_then_eval():
    """preresnet8 (BatchNorm) on 1x8x8, a few SGD steps in train mode so the running stats move."""
    torch.manual_seed(1)
    net = PreResNet(8, (1, 8, 8), 10)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x, y = DIGITS.normalize(DIGITS.train_x[:64]), DIGITS.train_y[:64]
    net.train()
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval(), DIGITS.normalize(DIGITS.train_x[100:124]), DIGITS.train_y[100:124]


def small_image_cnn():
    """A narrow cnn on 1x12x12 with 8 samples: N*K = 80 < D = 144, the SVD-of-A branch."""
    torch.manual_seed(2)
    return SmallCNN((1, 12, 12), 10, width=4), torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,))


def test_ce_hessian_factor_squares_to_the_logit_hessian():
    p = torch.randn(7, 10, dtype=torch.float64).softmax(1)
    lf = ce_hessian_factor(p)
    s = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    torch.testing.assert_close(lf.transpose(1, 2) @ lf, s, rtol=0, atol=1e-15)


@pytest.fixture(scope="module")
def trained_per_sample(trained):
    model, x, y = trained
    return per_sample_hessians(model, x, y)


@pytest.mark.parametrize("case", ["cnn-digits", "preresnet8-bn-eval", "cnn-12x12-svd"])
def test_exact_path_equals_dense_float64_hessian(trained, trained_per_sample, case):
    per = None
    if case == "cnn-digits":
        (model, x, y), per = trained, trained_per_sample
    elif case == "preresnet8-bn-eval":
        model, x, y = bn_net_trained_then_eval()
    else:
        model, x, y = small_image_cnn()
    ref = (per if per is not None else per_sample_hessians(model, x, y)).mean(0)
    ref_vals, ref_vecs = torch.linalg.eigh(ref)
    ref_vals, ref_vecs = ref_vals.flip(0), ref_vecs.flip(1)
    spec = input_hessian_spectrum(model, x, y, method="exact", k=5, dtype=torch.float64, chunk_size=5)
    assert spec.method == "exact" and spec.iterations == 0 and spec.converged
    d = x[0].numel()
    full = torch.cat([spec.all_eigenvalues, torch.zeros(d - len(spec.all_eigenvalues), dtype=torch.float64)])
    assert float((full - ref_vals).abs().max() / ref_vals[0]) <= EXACT_RTOL  # the whole spectrum
    assert float((spec.eigenvalues - ref_vals[:5]).abs().max() / ref_vals[0]) <= EXACT_RTOL
    gaps = (ref_vals[:6].diff().abs() / ref_vals[0]).min()
    assert gaps > 1e-4  # distinct top eigenvalues: the eigenvectors are defined up to sign
    cos = (spec.eigenvectors * ref_vecs[:, :5]).sum(0).abs()
    assert float((1 - cos).max()) <= 1e-8, cos
    assert float(spec.residuals.max()) <= 1e-12
    assert spec.trace == pytest.approx(float(ref.trace()), rel=EXACT_RTOL)
    factors = SampleFactors(model, x, chunk_size=5, dtype=torch.float64)
    assert rel(factors.gram(), ref) <= EXACT_RTOL  # the matrix itself, not only its spectrum


def test_a_tight_memory_budget_shrinks_the_chunk_not_the_answer(trained, trained_per_sample, monkeypatch):
    """hessian_dense_mb bounds the Gram *and* a chunk's factors: a budget that leaves room for 5
    samples' factors next to the 64 x 64 Gram gives chunks of 5, and the same spectrum."""
    from trainables.hessian import EXACT_BYTES_PER_D2, chunk_bytes_per_sample, chunk_within

    model, x, y = trained
    d, k = x[0].numel(), 10
    budget = EXACT_BYTES_PER_D2 * d * d + 5.5 * chunk_bytes_per_sample(k, d, 8)
    assert chunk_within(budget, EXACT_BYTES_PER_D2 * d * d, k, d, 8, 1000) == 5
    import trainables.hessian as hessian_module

    seen, real = [], hessian_module.factor_chunks

    def recorded(*args, **kwargs):  # our own chunk loop, observed: the spectrum really ran in chunks of 5
        for a in real(*args, **kwargs):
            seen.append(len(a))
            yield a

    monkeypatch.setattr(hessian_module, "factor_chunks", recorded)
    tight = input_hessian_spectrum(model, x, y, method="exact", k=5, dtype=torch.float64, dense_mb=budget / 2**20)
    assert seen and max(seen) == 5 and sum(seen) == len(y)
    ref = torch.linalg.eigvalsh(trained_per_sample.mean(0)).flip(0)[:5]
    assert float((tight.eigenvalues - ref).abs().max() / ref[0]) <= EXACT_RTOL
    with pytest.raises(HessianMethodError, match="hessian_dense_mb"):  # not even one sample fits beside the Gram
        input_hessian_spectrum(
            model, x, y, method="exact", dtype=torch.float64, dense_mb=EXACT_BYTES_PER_D2 * d * d / 2**20
        )


def test_wrong_logit_hessian_fails_the_same_comparison(trained, trained_per_sample):
    """Negative control: S = diag(p) (dropping -p p^T) is visibly wrong at the test's tolerance."""
    model, x, y = trained
    ref = trained_per_sample.mean(0)
    m = eval_copy(model, torch.float64)

    def gram(factor):
        a = torch.cat(list(factor_chunks(m, x.double(), 16, factor))).reshape(-1, x[0].numel())
        return a.T @ a / len(y)

    assert rel(gram(ce_hessian_factor), ref) <= EXACT_RTOL
    assert rel(gram(lambda p: torch.diag_embed(p.sqrt())), ref) > 1e-2


def test_subset_spectrum_equals_direct_computation_on_the_subset(trained, trained_per_sample):
    model, x, y = trained
    per = trained_per_sample
    factors = SampleFactors(model, x, chunk_size=16, dtype=torch.float64)
    for mask in (y == y[0], torch.arange(len(y)) < 30):  # one class (SVD branch, N*K < D), most samples (Gram)
        ref = torch.linalg.eigvalsh(per[mask].mean(0)).flip(0)
        spec = subset_spectrum(factors, mask, k=5)
        assert float((spec.eigenvalues - ref[:5]).abs().max() / ref[0]) <= EXACT_RTOL
        assert float(spec.residuals.max()) <= 1e-12
    w = torch.rand(len(y), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref_w = (per * w[:, None, None]).sum(0) / w.sum()
    assert rel(factors.gram(w), ref_w) <= EXACT_RTOL
    op = factors.operator(w)
    v = torch.randn(64, 3, dtype=torch.float64)
    torch.testing.assert_close(op @ v, ref_w @ v, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match=">= 0"):
        factors.spectrum(-w)


def test_group_spectra_equal_the_dense_hessian_of_each_class(trained, trained_per_sample):
    """Per-label exact spectra (the class-curvature detector's input) against dense float64 per class;
    a class with no sample is NaN, and a wrong grouping (shuffled labels) fails the same check."""
    from trainables.hessian import group_spectra

    model, x, y = trained
    per = trained_per_sample
    gs = group_spectra(model, x, y, 11, dtype=torch.float64, chunk_size=7)  # 11 groups: the last is empty
    for c in range(10):
        mask = y == c
        assert int(gs.count[c]) == int(mask.sum())
        if not mask.any():
            continue
        ref = per[mask].mean(0)
        vals, vecs = torch.linalg.eigh(ref)
        assert abs(float(gs.lambda_1[c]) - float(vals[-1])) <= EXACT_RTOL * float(vals[-1])
        assert abs(float(gs.trace[c]) - float(ref.trace())) <= EXACT_RTOL * float(ref.trace())
        assert 1 - abs(float(gs.vectors[c] @ vecs[:, -1])) <= 1e-8
    assert int(gs.count[10]) == 0 and torch.isnan(gs.lambda_1[10])
    # the exact spectrum computes the same per-class spectra from its own pass, and its total is unchanged
    fused = input_hessian_spectrum(
        model, x, y, method="exact", k=5, dtype=torch.float64, chunk_size=7, groups=y, n_groups=11
    )
    assert fused.groups is not None
    torch.testing.assert_close(fused.groups.lambda_1, gs.lambda_1, rtol=1e-12, atol=0, equal_nan=True)
    torch.testing.assert_close(fused.groups.trace, gs.trace, rtol=1e-12, atol=0, equal_nan=True)
    ref_top = torch.linalg.eigvalsh(per.mean(0)).flip(0)[:5]
    assert float((fused.eigenvalues - ref_top).abs().max() / ref_top[0]) <= EXACT_RTOL
    shuffled = group_spectra(
        model, x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))], 10, dtype=torch.float64
    )
    c = int(y[0])
    assert abs(float(shuffled.lambda_1[c]) - float(gs.lambda_1[c])) > 1e-3 * float(gs.lambda_1[c])


def test_float32_exact_path_is_close_to_float64(trained):
    model, x, y = trained
    ref = input_hessian_spectrum(model, x, y, method="exact", dtype=torch.float64)
    f32 = input_hessian_spectrum(model, x, y, method="exact", dtype=torch.float32)
    assert float((f32.eigenvalues - ref.eigenvalues).abs().max() / ref.eigenvalues[0]) < 1e-4


def test_gram_lanczos_matches_exact_and_reports_trace(trained):
    model, x, y = trained
    exact = input_hessian_spectrum(model, x, y, method="exact", dtype=torch.float64)
    gl = input_hessian_spectrum(
        model, x, y, method="gram-lanczos", dtype=torch.float64, iterations=20, max_iterations=64, tol=1e-8
    )
    assert gl.method == "gram-lanczos" and gl.converged and float(gl.residuals.max()) <= 1e-8
    torch.testing.assert_close(gl.eigenvalues, exact.eigenvalues, rtol=1e-9, atol=0)
    assert gl.trace == pytest.approx(exact.trace, rel=1e-12)
    assert isinstance(SampleFactors(model, x).operator(), GramOperator)


def gelu_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 5))
    return net, torch.randn(10, 1, 4, 4), torch.randint(0, 5, (10,))


@pytest.mark.parametrize("method", ["exact", "gram-lanczos", "gauss-newton"])
def test_smooth_model_is_refused_for_jts_j_paths(method):
    net, x, y = gelu_net()
    with pytest.raises(HessianMethodError) as e:
        input_hessian_spectrum(net, x, y, method=method, model_name="gelu-mlp")
    msg = str(e.value)
    assert isinstance(e.value, SweeperError) and "\n" not in msg
    assert f"hessian_method={method!r}" in msg and "'gelu-mlp'" in msg and "valid: auto, double-backward" in msg
    with pytest.raises(HessianMethodError):
        SampleFactors(net, x)


def test_auto_uses_hvp_lanczos_on_a_smooth_model():
    net, x, y = gelu_net()
    ref = torch.linalg.eigvalsh(per_sample_hessians(net, x, y).mean(0)).flip(0)
    spec = input_hessian_spectrum(net, x, y, method="auto", k=3, dtype=torch.float64, iterations=16, tol=1e-8)
    assert spec.method == "double-backward" and "not piecewise linear" in spec.reason
    assert spec.converged
    torch.testing.assert_close(spec.eigenvalues, ref[:3], rtol=1e-8, atol=0)


class GeluNet(nn.Module):
    """A smooth model (no ``piecewise_linear``): J^T S J is not its input Hessian."""

    def __init__(self, shape, classes):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(shape).prod()), 16), nn.GELU())
        self.head = nn.Linear(16, classes)

    def features(self, x):  # penultimate features: geometry and detection read them
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def test_a_smooth_model_is_refused_for_exact_by_the_cli_and_runs_hvp_lanczos_under_auto(tmp_path, capsys):
    from sweeper.cli import main
    from trainables.models import MODELS, ModelEntry, register_model

    register_model(
        ModelEntry("gelunet", lambda n, s, k: GeluNet(s, k), lambda n: n == "gelunet", lambda n: 1e-4, "gelunet")
    )
    try:
        capsys.readouterr()
        assert main(["trial", "--model", "gelunet", "--epochs", "1", "--hessian-method", "exact"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not piecewise linear" in err[0] and "epoch" not in err[0], err
        out = tmp_path / "t.json"
        assert (
            main(
                [
                    "trial",
                    "--model",
                    "gelunet",
                    "--epochs",
                    "1",
                    "--set",
                    "hessian_samples=100",
                    "--json",
                    str(out),
                    "--quiet",
                ]
            )
            == 0
        )
        h = json.loads(out.read_text())["hessian"]
        assert h["method_used"] == "double-backward" and "not piecewise linear" in h["reason"]
    finally:
        MODELS.pop("gelunet")


def test_auto_plan_follows_the_memory_budget():
    pl = dict(piecewise_linear=True, model_name="cnn", n=1000, classes=10)
    for d in (64, 784, 3072):  # the shipped shapes: exact under the default 1024 MiB
        assert plan_spectrum("auto", d=d, dense_mb=1024, **pl)[0] == "exact"
    path, why = plan_spectrum(
        "auto", d=3072, dense_mb=200, **pl
    )  # 24*D^2 = 216 MiB > 200; A + one sample's chunk = 118 MiB
    assert path == "gram-lanczos" and "A (118 MiB) fits" in why
    assert plan_spectrum("auto", d=3072, dense_mb=100, **pl)[0] == "double-backward"
    assert plan_spectrum("auto", d=3072, dense_mb=10, **{**pl, "n": 10})[0] == "exact"  # N*K < D: SVD of A
    with pytest.raises(HessianMethodError, match="needs 217 MiB > hessian_dense_mb=200"):
        plan_spectrum("exact", d=3072, dense_mb=200, **pl)
    with pytest.raises(HessianMethodError, match="gram-lanczos"):
        plan_spectrum("gram-lanczos", d=3072, dense_mb=100, **pl)


def flat_top_matrix(d=300):
    """Top five eigenvalues 1.0 ... 0.98 (gaps of 0.5%) above a bulk in [0, 0.97]: slow for Lanczos."""
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.cat(
        [
            torch.tensor([1.0, 0.995, 0.99, 0.985, 0.98], dtype=torch.float64),
            torch.linspace(0.97, 0.0, d - 5, dtype=torch.float64),
        ]
    )
    return q @ torch.diag(lam) @ q.T, lam, q


def test_lanczos_tolerance_converges_on_a_flat_spectrum_and_flags_when_it_cannot():
    a, lam, q = flat_top_matrix()
    short = converged_eigenpairs(a, k=5, iterations=20, max_iterations=20, tol=1e-3)
    assert not short.converged and float(short.residuals.max()) > 1e-3  # negative control: flagged
    err_short = float((short.eigenvalues - lam[:5]).abs().max())
    assert err_short > 1e-3  # and it was indeed wrong
    full = converged_eigenpairs(a, k=5, iterations=20, max_iterations=300, tol=1e-6)
    assert full.converged and full.iterations > 20 and float(full.residuals.max()) <= 1e-6
    torch.testing.assert_close(full.eigenvalues, lam[:5], rtol=1e-9, atol=0)
    cos = (full.eigenvectors * q[:, :5]).sum(0).abs()
    assert float((1 - cos).max()) < 1e-6, cos
    # residuals are measured, not estimated: they equal ||A v - lambda v|| recomputed here
    r = (a @ full.eigenvectors - full.eigenvectors * full.eigenvalues).norm(dim=0)
    torch.testing.assert_close(full.residuals, r / lam[0], rtol=1e-6, atol=1e-15)


def test_trial_records_the_exact_path_and_its_summary():
    cfg = TrialConfig(epochs=1, theta=0.1, hessian_samples=100, geometry=False)
    res = run_trial(cfg, data=DIGITS)
    m = res.metrics
    assert m["hessian_exact"] == 1.0 and m["spectrum_converged"] == 1.0 and m["lanczos_iterations"] == 0
    assert m["ritz_residual_max"] < 1e-6  # float32 Jacobians, float64 eigh
    assert 1.0 <= m["effective_rank"] <= 64 and 0 < m["top_k_trace_fraction"] <= 1
    assert m["hessian_trace"] >= m["lambda_1"] > 0
    info = res.to_json_dict()["hessian"]
    assert info["method_used"] == "exact" and "piecewise linear" in info["reason"]


def test_the_top_eigenpair_fast_path_matches_a_float64_eigh_and_a_wrong_pair_fails_the_check():
    """Above TOP_EIG_DENSE_D per-class curvature takes ARPACK's top pair, not a full eigh: same numbers."""
    from trainables.hessian import TOP_EIG_DENSE_D, top_eigenpair

    g = torch.Generator().manual_seed(0)
    d = TOP_EIG_DENSE_D + 76
    a = torch.randn(300, d, dtype=torch.float64, generator=g)
    h = a.T @ a / 300  # a PSD Gram, as the per-class J^T S J sums are
    evals, evecs = torch.linalg.eigh(h)

    def agrees(lam, vec):  # the stated tolerance: 1e-10 relative on the value, 1e-10 on 1 - |cos|
        return abs(lam - float(evals[-1])) <= 1e-10 * float(evals[-1]) and 1 - abs(float(vec @ evecs[:, -1])) <= 1e-10

    lam, vec = top_eigenpair(h)
    assert agrees(lam, vec) and abs(float(vec.norm()) - 1) < 1e-12
    assert not agrees(float(evals[-2]), evecs[:, -2])  # the check can fail: the runner-up pair does not pass
    assert top_eigenpair(h)[0] == lam  # a fixed start vector: the same number every run
