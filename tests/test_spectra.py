"""Listing 7's overlap and Table 2's metrics read from a spectrum."""

import pytest
import torch
from hessian_reference import DIGITS

from trainables.config import TrialConfig
from trainables.spectrum.spectra import listing7_overlap, spectrum_metrics
from trainables.training.train import Trial


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
    from trainables.spectrum.spectra import Spectrum

    d = torch.zeros(4)
    d[0] = 1.0
    vecs = torch.eye(4)[:, [1, 0, 2]]  # the trigger-aligned vector is the second
    vecs[:, 1] *= -1  # sign is arbitrary
    metrics, fixed, overlaps = spectrum_metrics(Spectrum(torch.tensor([3.0, 2.0, 1.0]), vecs, 3, 1.0), d)
    assert metrics["lambda_1"] == 3.0 and metrics["eig_gap"] == 1.0
    assert metrics["max_overlap_index"] == 1 and metrics["max_overlap_sq"] == pytest.approx(1.0)
    assert overlaps[1] > 0 and fixed[0, 1] > 0
