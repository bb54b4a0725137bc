"""The input-Hessian operator against dense float64 references, and the spectrum entry point: its
plan, its paths end to end, smooth models refused or sent to HVP Lanczos, and the trial's spectrum."""

import json

import pytest
import torch
import torch.nn.functional as F
from hessian_reference import DIGITS, per_sample_hessians, trained_digits_cnn
from torch import nn
from torch.func import hessian, vmap

from trainables.config import SweeperError, TrialConfig
from trainables.spectrum.exact_hessian import GramOperator, HessianMethodError, SampleFactors
from trainables.spectrum.hessian import InputHessian, input_hessian_spectrum, plan_spectrum
from trainables.spectrum.lanczos import top_eigenpairs
from trainables.training.train import run_trial


@pytest.fixture(scope="module")
def trained():
    return trained_digits_cnn()


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


def test_gauss_newton_is_wrong_for_smooth_activations():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 5))
    x, y = torch.randn(10, 1, 4, 4), torch.randint(0, 5, (10,))
    v = torch.randn(16, dtype=torch.float64)
    db = InputHessian(net, x, y, dtype=torch.float64) @ v
    gn = InputHessian(net, x, y, method="gauss-newton", dtype=torch.float64) @ v
    assert float((db - gn).norm() / db.norm()) > 1e-2


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
    from trainables.networks.models import MODELS, ModelEntry, register_model

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
