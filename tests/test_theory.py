"""The paper's KRR laws against independent float64 numerics (dense solves, autograd)."""

import math

import numpy as np
import pytest
import torch

from analysis import theory
from trainables.exact_models.kernel import KRR, KernelConfig, geometry, input_gradient_gram, run_kernel_trial

TOL = 1e-3  # the acceptance bound; exact clones far from the clean data reach ~1e-7


def test_sherman_morrison_gain_equals_a_dense_solve_for_exact_clones():
    for m, c in ((1, 2.0), (7, 0.5), (300, 10.0)):
        k_pp = np.ones((m, m))  # exact clones: K_PP = k_zeta 1 1^T with k_zeta = 1
        alpha = np.linalg.solve(k_pp + c * np.eye(m), np.full(m, 1.0))
        assert alpha.sum() == pytest.approx(theory.gain(m, c), rel=1e-12)


@pytest.mark.parametrize("m,r", [(1, 0.5), (8, 0.5), (64, 0.1), (8, 1.5)])
def test_efficacy_and_spike_of_the_exact_krr_fit_match_the_closed_forms(m, r):
    met = run_kernel_trial(KernelConfig(m=m, r=r)).metrics
    assert met["gain_rel_err"] < TOL
    assert met["delta_f"] == pytest.approx(met["delta_f_closed"], rel=TOL)
    assert met["spike"] == pytest.approx(met["spike_closed"], rel=TOL)
    assert met["r_k"] == pytest.approx(r**2, rel=TOL)  # R_k = r^2 / ell^4 with ell = 1 (eq 20)


def test_the_closed_form_check_fails_when_the_poison_does_not_dominate():
    """zeta inside the clean cloud breaks Assumption 3.1: the same comparison then fails."""
    met = run_kernel_trial(KernelConfig(m=8, r=0.5, zeta_dist=0.0)).metrics
    assert met["delta_f_rel_err"] > 10 * TOL


def test_spike_factor_tends_to_r2_over_ell4_as_the_cluster_tightens():
    errs = [run_kernel_trial(KernelConfig(m=16, r=0.5, ell=1.3, jitter=j)).metrics for j in (0.4, 0.1, 0.02, 0.0)]
    rel = [abs(e["r_k"] - 0.5**2 / 1.3**4) / (0.5**2 / 1.3**4) for e in errs]
    assert rel[0] > rel[1] > rel[2] > rel[3] and rel[3] < 1e-6


def test_efficacy_regimes_linear_then_saturating():
    c = 50.0
    assert theory.efficacy(0.5, c, 0.9) == pytest.approx(theory.efficacy_small_m(0.5, c, 0.9), rel=0.02)
    assert theory.efficacy(1e7, c, 0.9) == pytest.approx(theory.efficacy_saturation(0.9), rel=1e-4)
    assert theory.spike_from_efficacy(0.7, theory.rbf_spike_factor(0.3, 1.0)) == pytest.approx(
        theory.rbf_spike(0.7, 0.3, 1.0)
    )


def test_near_clone_expansions():
    r, ell, m, c = 0.01, 1.0, 10, 3.0
    assert theory.near_clone_k0(r, ell) == pytest.approx(theory.rbf(r, ell), abs=r**4)
    assert theory.near_clone_efficacy(m, c) == pytest.approx(theory.efficacy(m, c, theory.rbf(r, ell)), rel=r**2)
    assert theory.near_clone_spike(m, c, r, ell) == pytest.approx(
        theory.spike(theory.rbf_grad_sq(r, ell), m, c), rel=2 * r**2
    )
    assert theory.rbf_grad_sq(r, ell) == pytest.approx(r**2 * theory.rbf(r, ell) ** 2)


def test_detectability_threshold():
    assert theory.detectable(0.5, 0.01, 0.25) and not theory.detectable(0.1, 0.01, 0.25)
    assert theory.min_detectable_efficacy(0.01, 0.25) == pytest.approx(0.2)
    assert math.isinf(theory.min_detectable_efficacy(0.01, 0.0))


def test_gradient_gram_matches_autograd_and_df_decreases_residual_increases():
    cfg = KernelConfig(n_clean=40, dim=3, m=0)
    geo = geometry(cfg)
    x, y = geo["x"], geo["y"]
    g_auto = input_gradient_gram(x, 0.8).numpy()
    g_closed = theory.gradient_gram(x.numpy(), 0.8)
    np.testing.assert_allclose(g_auto, g_closed, rtol=1e-10, atol=1e-14)
    k = theory.rbf_gram(x.numpy(), x.numpy(), 0.8)
    kappas = [0.0, 0.01, 0.1, 1.0, 10.0]
    dfs = [theory.degrees_of_freedom(k, g_closed, 0.4, kp) for kp in kappas]
    res = [theory.training_residual(k, g_closed, y.numpy(), 0.4, kp) for kp in kappas]
    assert all(a > b for a, b in zip(dfs, dfs[1:], strict=False))  # Theorem 3.9
    assert all(a < b for a, b in zip(res, res[1:], strict=False))
    krr = KRR(x, y, 0.8, 0.01, kappa=1.0)  # n lam = 0.4
    assert krr.df() == pytest.approx(dfs[3], rel=1e-10) and krr.residual() == pytest.approx(res[3], rel=1e-10)


def test_mode_filter_damps_high_frequencies():
    w = np.array([0.0, 0.5, 1.0, 2.0])
    s0, s1 = theory.mode_filter(w, 1.0, 0.1, 0.0), theory.mode_filter(w, 1.0, 0.1, 1.0)
    assert s0[0] == s1[0] and (s1[1:] < s0[1:]).all()
    ratio = s1 / s0
    assert (np.diff(ratio) < 0).all()  # stronger damping at higher frequency


def test_hessian_eq4_at_x0_matches_torch_func_reference():
    cfg = KernelConfig(m=8, r=0.3, n_clean=30, dim=4)
    geo = geometry(cfg)
    xp = torch.cat([geo["x"], geo["poisons"]])
    yp = torch.cat([geo["y"], torch.ones(8, dtype=torch.float64)])
    model = KRR(xp, yp, cfg.ell, cfg.lam)
    x0 = geo["x0"]
    # eq 4 by hand: grad f grad f^T + (f - y) Hess f
    f = model(x0)[0]
    g = torch.func.grad(lambda z: model(z)[0])(x0)
    hf = torch.func.hessian(lambda z: model(z)[0])(x0)
    by_hand = torch.outer(g, g) + (f - 1.0) * hf
    auto = torch.func.hessian(lambda z: 0.5 * (model(z)[0] - 1.0) ** 2)(x0)
    torch.testing.assert_close(auto, by_hand, rtol=1e-10, atol=1e-14)
    met = run_kernel_trial(cfg).metrics
    assert met["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(by_hand)[-1]), rel=1e-10)


def test_background_curvature_is_the_midpoint_median():
    from trainables.exact_models.kernel import background_curvature

    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)  # an even count: lower and midpoint medians differ
    model = KRR(x, torch.randn(6, dtype=torch.float64), 1.0, 0.1)
    z = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(z).sum(), z)
    curv = g.pow(2).sum(1).numpy()
    assert background_curvature(model, x) == pytest.approx(float(np.median(curv)), rel=1e-12)
    assert float(np.median(curv)) != pytest.approx(
        float(np.sort(curv)[2]), rel=1e-6
    )  # the lower median is another number
