"""The CUDA paths: each checked against the CPU in float64 (skipped where no GPU is visible).

Run on a GPU machine with ``pytest tests/test_cuda.py``; these tests need only torch, numpy, scipy and
scikit-learn (no Ray, no MLflow), so they also run where those are not installed.
"""

from __future__ import annotations

import time

import pytest
import torch

from trainables.config import TrialConfig
from trainables.data.images import load_digits
from trainables.defence.penalty import PENALTIES
from trainables.spectrum.hessian import input_hessian_spectrum
from trainables.training.train import Trial, run_trial

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible: run on a GPU machine")
DIGITS = load_digits()
SPECTRUM_RTOL = 1e-6  # float64 on the GPU vs float64 on the CPU: the same operator, different reduction order


def _trained(device: str):
    trial = Trial(TrialConfig(epochs=2, theta=0.1, hessian=False, geometry=False, device=device), DIGITS)
    while not trial.done:
        trial.train_epoch()
    return trial.model


def _xy(n=200):
    return DIGITS.normalize(DIGITS.train_x[:n]), DIGITS.train_y[:n]


@pytest.mark.parametrize("method", ["exact", "gram-lanczos", "double-backward", "gauss-newton"])
def test_every_spectrum_path_on_cuda_matches_the_cpu_float64_exact_spectrum(method):
    model = _trained("cpu")
    x, y = _xy()
    ref = input_hessian_spectrum(model, x, y, method="exact", dtype=torch.float64, k=5)
    gpu = input_hessian_spectrum(
        model.to("cuda"), x.cuda(), y.cuda(), method=method, dtype=torch.float64, k=5, tol=1e-8, max_iterations=400
    )
    rel = float((gpu.eigenvalues.cpu() - ref.eigenvalues).abs().max() / ref.eigenvalues.abs().max())
    tol = SPECTRUM_RTOL if method == "exact" else 1e-5 if method != "gauss-newton" else 1e-5
    assert rel <= tol, (method, rel)
    overlap = (gpu.eigenvectors[:, 0].cpu().double() @ ref.eigenvectors[:, 0].double()).abs()
    assert overlap > 1 - 1e-6, (method, float(overlap))


def test_the_cuda_spectrum_comparison_can_fail():
    """The check above catches a wrong operator: the spectrum of a perturbed model is far off."""
    model = _trained("cpu")
    x, y = _xy()
    ref = input_hessian_spectrum(model, x, y, method="exact", dtype=torch.float64, k=5)
    with torch.no_grad():
        next(model.parameters()).mul_(1.05)
    gpu = input_hessian_spectrum(model.to("cuda"), x.cuda(), y.cuda(), method="exact", dtype=torch.float64, k=5)
    rel = float((gpu.eigenvalues.cpu() - ref.eigenvalues).abs().max() / ref.eigenvalues.abs().max())
    assert rel > SPECTRUM_RTOL


@pytest.mark.parametrize("name", sorted(PENALTIES))
def test_penalties_on_cuda_match_the_cpu_in_float64(name):
    model = _trained("cpu").double()
    x, y = _xy(64)
    x = x.double()
    ce_c, pen_c = PENALTIES[name](model, x, y, 100.0)
    ce_g, pen_g = PENALTIES[name](model.to("cuda"), x.cuda(), y.cuda(), 100.0)
    assert abs(float(ce_g) - float(ce_c)) <= 1e-10 * max(1.0, abs(float(ce_c)))
    assert abs(float(pen_g) - float(pen_c)) <= 1e-9 * max(1.0, abs(float(pen_c)))


def test_a_whole_trial_with_detection_and_baselines_runs_on_cuda_like_on_the_cpu():
    """Same config on both devices: training numerics differ in the last digits, so the outcome is
    compared loosely (accuracy, attack success, top curvature), and the device is timed."""
    kw = dict(
        epochs=4, theta=0.1, kappa=0.0, detect_baselines="nc,ss,ac", nc_steps=50, detect_samples=50, hessian_samples=500
    )
    t0 = time.perf_counter()
    cpu = run_trial(TrialConfig(device="cpu", **kw), data=DIGITS)
    t_cpu = time.perf_counter() - t0
    t0 = time.perf_counter()
    gpu = run_trial(TrialConfig(device="cuda", **kw), data=DIGITS)
    t_gpu = time.perf_counter() - t0
    print(f"digits trial with detection: cpu {t_cpu:.1f} s, cuda {t_gpu:.1f} s")
    assert gpu.status == cpu.status == "completed"
    for key in ("clean_acc", "asr"):
        assert abs(gpu.metrics[key] - cpu.metrics[key]) < 0.1, (key, gpu.metrics[key], cpu.metrics[key])
    for key in ("nc_anomaly_index", "ss_auroc", "ac_auroc", "det_lambda_ratio"):
        assert key in gpu.metrics and gpu.metrics[key] == gpu.metrics[key], key  # present and not NaN
    assert gpu.artifacts["hessian"]["method_used"] == cpu.artifacts["hessian"]["method_used"]


def test_preresnet_with_augmentation_and_penalty_trains_on_cuda(tmp_path):
    import numpy as np

    from trainables.data.images import write_cifar_batch

    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        write_cifar_batch(
            folder / f"data_batch_{i}",
            rng.integers(0, 256, (100, 3, 32, 32)).astype(np.uint8),
            rng.integers(0, 10, 100),
        )
    write_cifar_batch(
        folder / "test_batch", rng.integers(0, 256, (100, 3, 32, 32)).astype(np.uint8), rng.integers(0, 10, 100)
    )
    cfg = TrialConfig(
        dataset="cifar10",
        data_dir=str(tmp_path),
        verify_checksums=False,
        model="preresnet20",
        trigger="warp",
        augment=True,
        kappa=100.0,
        epochs=2,
        hessian_samples=64,
        hessian_iterations=8,
        detect_samples=20,
        device="cuda",
    )
    res = run_trial(cfg)
    assert res.status == "completed" and res.artifacts["hessian"]["method_used"]
    assert res.metrics["lambda_1"] == res.metrics["lambda_1"]
