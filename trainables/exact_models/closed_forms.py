"""The paper's closed forms for kernel ridge regression (Sec. 3, App. A, C, D), numbered as there.

Notation: n training points, ridge lambda (eq 2 uses n*lambda, so c = n*lambda, eq 7), m dirty-label
poisons cloned at zeta with label y_t, trigger point x0, k0 = k(x0, zeta), k_zeta = k(zeta, zeta),
r = ||x0 - zeta||, RBF length scale ell. Everything is plain float / numpy and imports nothing of this project, so the trial layer
(``trainables/exact_models/kernel.py``, whose numerics test these laws) can use it; the theory sweep and its
figures live in ``analysis/theory.py``.
"""

from __future__ import annotations

import math

import numpy as np


def gain(m: float, c: float, k_zeta: float = 1.0) -> float:
    """S(m; lambda) = m / (c + k_zeta m)  (eq 8); 1^T alpha_P = y_t S (eq 9, Lemma 3.2)."""
    return m / (c + k_zeta * m)


def efficacy(m: float, c: float, k0: float, y_t: float = 1.0, k_zeta: float = 1.0) -> float:
    """Delta f(x0) = k0 y_t S(m; lambda)  (eqs 10-11, Theorem 3.3)."""
    return k0 * y_t * gain(m, c, k_zeta)


def efficacy_small_m(m: float, c: float, k0: float, y_t: float = 1.0) -> float:
    """m << c / k_zeta: Delta f ~ k0 y_t m / c, linear in m  (eq 12)."""
    return k0 * y_t * m / c


def efficacy_saturation(k0: float, y_t: float = 1.0, k_zeta: float = 1.0) -> float:
    """m -> infinity: Delta f -> k0 y_t / k_zeta  (eq 13)."""
    return k0 * y_t / k_zeta


def spike(grad_k_sq: float, m: float, c: float, k_zeta: float = 1.0) -> float:
    """Lambda_GN(x0) = ||grad_x k(x0, zeta)||^2 S(m; lambda)^2  (eqs 14-15, Theorem 3.4)."""
    return grad_k_sq * gain(m, c, k_zeta) ** 2


def spike_factor(grad_k_sq: float, k0: float) -> float:
    """R_k(x0, zeta) = ||grad_x k(x0, zeta)||^2 / k0^2  (eq 17)."""
    return grad_k_sq / k0**2


def spike_from_efficacy(delta_f: float, r_k: float) -> float:
    """Lambda_GN = R_k (Delta f)^2: curvature quadratic in efficacy  (eq 16, eq 40)."""
    return r_k * delta_f**2


# ----------------------------------------------------------------------------- exponential (RBF) kernel
def rbf(r: float, ell: float) -> float:
    """k = exp(-r^2 / (2 ell^2))  (eq 18)."""
    return math.exp(-(r**2) / (2 * ell**2))


def rbf_grad_sq(r: float, ell: float) -> float:
    """||grad_x k(x0, zeta)||^2 = r^2 / ell^4 k0^2  (eq 19)."""
    return r**2 / ell**4 * rbf(r, ell) ** 2


def rbf_spike_factor(r: float, ell: float) -> float:
    """R_k = r^2 / ell^4  (eq 20)."""
    return r**2 / ell**4


def rbf_spike(delta_f: float, r: float, ell: float) -> float:
    """Lambda_GN = r^2 / ell^4 (Delta f)^2  (eq 21)."""
    return rbf_spike_factor(r, ell) * delta_f**2


def near_clone_k0(r: float, ell: float) -> float:
    """k0 = 1 - r^2 / (2 ell^2) + O(r^4/ell^4)  (eq 22, eq 44)."""
    return 1 - r**2 / (2 * ell**2)


def near_clone_efficacy(m: float, c: float, y_t: float = 1.0) -> float:
    """Delta f = y_t S(m; lambda) [1 + O(r^2/ell^2)]  (eq 23, eq 42)."""
    return y_t * gain(m, c)


def near_clone_spike(m: float, c: float, r: float, ell: float) -> float:
    """Lambda_GN = S^2 r^2 / ell^4 [1 + O(r^2/ell^2)]  (eq 24, eq 43)."""
    return gain(m, c) ** 2 * r**2 / ell**4


def detectable(delta_f: float, lambda_clean: float, r_k: float) -> bool:
    """Remark 3.5: the spike stands out when (Delta f)^2 >= Lambda_clean / R_k."""
    return delta_f**2 >= lambda_clean / r_k if r_k > 0 else False


def min_detectable_efficacy(lambda_clean: float, r_k: float) -> float:
    """The efficacy above which the spike is visible: sqrt(Lambda_clean / R_k)  (Remark 3.5)."""
    return math.sqrt(lambda_clean / r_k) if r_k > 0 else math.inf


# ----------------------------------------------------------------------------- gradient regularisation
def rbf_gram(x: np.ndarray, z: np.ndarray, ell: float) -> np.ndarray:
    """K_ij = exp(-||x_i - z_j||^2 / (2 ell^2))."""
    d2 = (x**2).sum(1)[:, None] + (z**2).sum(1)[None, :] - 2 * x @ z.T
    return np.exp(-np.maximum(d2, 0.0) / (2 * ell**2))


def gradient_gram(x: np.ndarray, ell: float) -> np.ndarray:
    """G = sum_i (grad_x k(x_i, X))^T (grad_x k(x_i, X))  (eq 27), for the RBF kernel.

    grad_x k(x_i, x_j) = -(x_i - x_j) / ell^2 k(x_i, x_j), so G_jl = sum_i <grad k(x_i, x_j), grad k(x_i, x_l)>.
    """
    k = rbf_gram(x, x, ell)
    diff = x[:, None, :] - x[None, :, :]  # (i, j, p)
    grads = -diff / ell**2 * k[:, :, None]
    return np.einsum("ijp,ilp->jl", grads, grads)


def gr_coefficients(k: np.ndarray, g: np.ndarray, y: np.ndarray, ridge: float, kappa: float) -> np.ndarray:
    """alpha of (K + ridge I + kappa G) alpha = y  (eq 26; ridge = n lambda keeps kappa = 0 equal to eq 2)."""
    return np.linalg.solve(k + ridge * np.eye(len(k)) + kappa * g, y)


def degrees_of_freedom(k: np.ndarray, g: np.ndarray, ridge: float, kappa: float) -> float:
    """df(kappa) = tr[K (K + ridge I + kappa G)^{-1}]  (eq 28); strictly decreasing in kappa (Thm 3.9)."""
    return float(np.trace(np.linalg.solve((k + ridge * np.eye(len(k)) + kappa * g).T, k.T).T))


def training_residual(k: np.ndarray, g: np.ndarray, y: np.ndarray, ridge: float, kappa: float) -> float:
    """||y - K alpha||^2 of the gradient-regularised fit; increasing in kappa (Thm 3.9)."""
    alpha = gr_coefficients(k, g, y, ridge, kappa)
    return float(((y - k @ alpha) ** 2).sum())


def rbf_spectral_density(omega: np.ndarray, ell: float, dim: int = 1) -> np.ndarray:
    """Fourier transform of the RBF kernel: (2 pi ell^2)^{p/2} exp(-ell^2 ||omega||^2 / 2)."""
    return (2 * math.pi * ell**2) ** (dim / 2) * np.exp(-(ell**2) * np.asarray(omega) ** 2 / 2)


def mode_filter(omega: np.ndarray, ell: float, lam: float, kappa: float, dim: int = 1) -> np.ndarray:
    """s(omega) = k_hat(omega) / (k_hat(omega) + lambda + kappa ||omega||^2)  (Remark 3.10): the penalty
    damps high frequencies quadratically, like a longer effective length scale."""
    kh = rbf_spectral_density(omega, ell, dim)
    return kh / (kh + lam + kappa * np.asarray(omega) ** 2)
