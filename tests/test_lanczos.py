"""Scaled Lanczos on dense symmetric matrices: signs kept, tiny operators rescued by the scaling,
measured Ritz residuals and restarts on a flat spectrum (the operator itself: tests/test_hessian.py)."""

import torch

from trainables.spectrum.lanczos import converged_eigenpairs, top_eigenpairs


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
