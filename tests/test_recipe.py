"""The training recipe's pieces: the step learning-rate schedule and whole-batch augmentation."""

import math

import torch

from trainables.config import TrialConfig
from trainables.training.recipe import augment_batch, lr_at


def test_lr_schedule_drops_every_third():
    cfg = TrialConfig(epochs=15, lr=0.1)
    assert [round(lr_at(cfg, e), 6) for e in (0, 4, 5, 9, 10, 14)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    cfg90 = TrialConfig(epochs=90, lr=0.1)
    assert lr_at(cfg90, 29) == 0.1 and math.isclose(lr_at(cfg90, 30), 0.01) and math.isclose(lr_at(cfg90, 60), 0.001)
    assert lr_at(TrialConfig(epochs=1, lr=0.1), 0) == 0.1


def test_augmentation_equals_per_sample_crop_and_flip():
    x = torch.rand(7, 3, 10, 10)
    pad = 2
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = augment_batch(x, pad, g1)
    offs = torch.randint(0, 2 * pad + 1, (2, 7), generator=g2)
    flip = torch.rand(7, generator=g2) < 0.5
    for i in range(7):
        p = torch.nn.functional.pad(x[i], (pad,) * 4)
        ref = p[:, offs[0, i] : offs[0, i] + 10, offs[1, i] : offs[1, i] + 10]
        if flip[i]:
            ref = ref.flip(2)
        assert torch.equal(out[i], ref)
