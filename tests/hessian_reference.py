"""Reference input Hessians for the spectrum tests (a helper, not a test module).

A small CNN trained on digits, and the dense float64 per-sample input Hessians of the CE by
torch.func (second derivatives included), which the operator, the exact path and the per-group
spectra are checked against.
"""

import torch
import torch.nn.functional as F
from torch.func import hessian, vmap

from trainables.config import TrialConfig
from trainables.data.images import load_digits
from trainables.spectrum.exact_hessian import eval_copy
from trainables.training.train import Trial

DIGITS = load_digits()
EXACT_RTOL = 1e-10  # float64 exact path vs dense float64 torch.func.hessian (we see ~1e-15)


def trained_digits_cnn():
    """(model, x, y): the default cnn after 2 epochs on digits (theta 0.1), and 40 normalized training samples."""
    trial = Trial(TrialConfig(epochs=2, theta=0.1, hessian=False, geometry=False), DIGITS)
    while not trial.done:
        trial.train_epoch()
    x = DIGITS.normalize(DIGITS.train_x[:40])
    y = DIGITS.train_y[:40]
    return trial.model, x, y


def per_sample_hessians(model, x, y):
    """(N, D, D) float64 per-sample input Hessians of the CE, by torch.func (second derivatives included)."""
    m = eval_copy(model, torch.float64)

    def loss(xi, yi):
        return F.cross_entropy(m(xi[None]), yi[None])

    d = x[0].numel()
    return vmap(hessian(loss))(x.double(), y).reshape(len(y), d, d)


def rel(a, b):
    return float((a - b).norm() / b.norm())
