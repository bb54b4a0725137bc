import numpy as np
import torch

from trainables.attack.poison import Poisoner, deterministic_uniforms


def labels(n=5000, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 10, n))


def test_deterministic_picks_the_same_indices_twice_and_about_theta():
    y = labels()
    a = Poisoner(y, 0.1, 0, "deterministic", seed=3).mask_for_epoch()
    b = Poisoner(y, 0.1, 0, "deterministic", seed=3).mask_for_epoch()
    assert torch.equal(a, b)
    p = Poisoner(y, 0.1, 0, "deterministic", seed=3)
    assert torch.equal(p.mask_for_epoch(), p.mask_for_epoch())  # fixed across epochs
    eligible = int((y != 0).sum())
    frac = int(a.sum()) / eligible
    sd = (0.1 * 0.9 / eligible) ** 0.5
    assert abs(frac - 0.1) < 4 * sd
    assert not bool((a & (y == 0)).any())  # never a target-class sample
    c = Poisoner(y, 0.1, 0, "deterministic", seed=4).mask_for_epoch()
    assert not torch.equal(a, c)  # combined with the trial seed


def test_per_index_decisions_do_not_depend_on_dataset_size():
    assert np.array_equal(deterministic_uniforms(100, 7), deterministic_uniforms(1000, 7)[:100])


def test_stochastic_redraws_every_epoch_and_restores_from_state():
    y = labels()
    p = Poisoner(y, 0.1, 0, "stochastic", seed=0)
    state = p.state_dict()
    m1, m2 = p.mask_for_epoch(), p.mask_for_epoch()
    assert not torch.equal(m1, m2)
    assert not bool((m1 & (y == 0)).any())
    p.load_state_dict(state)
    assert torch.equal(p.mask_for_epoch(), m1)


def test_poisoned_labels_take_the_target():
    y = labels(100)
    p = Poisoner(y, 0.5, 3, "deterministic", seed=0)
    m = p.mask_for_epoch()
    lab = p.poisoned_labels(m)
    assert (lab[m] == 3).all() and torch.equal(lab[~m], y[~m])


def test_theta_zero_poisons_nothing():
    y = labels(100)
    for mode in ("deterministic", "stochastic"):
        assert int(Poisoner(y, 0.0, 0, mode, 0).mask_for_epoch().sum()) == 0


def test_all_to_all_poisons_every_class_and_labels_y_plus_one_mod_k():
    """Issue 22: under all-to-all every sample is eligible, a poisoned one of class y is labelled (y+1) mod K,
    and the ASR counts every test image, wanted at (y+1) mod K."""
    y = labels()
    p = Poisoner(y, 0.2, 0, "deterministic", seed=1, num_classes=10, target_mode="all-to-all")
    m = p.mask_for_epoch()
    lab = p.poisoned_labels(m)
    assert torch.equal(lab[m], (y[m] + 1) % 10) and torch.equal(lab[~m], y[~m])
    assert bool((m & (y == 0)).any())  # the "target" class is poisoned too: there is none
    assert bool((lab[m] == 0).any() and (y[m] == 9).any())  # 9 wraps to 0
    assert p.attack_set(y).all() and torch.equal(p.attack_labels(y), (y + 1) % 10)
    one = Poisoner(y, 0.2, 0, "deterministic", seed=1)
    assert torch.equal(one.attack_set(y), y != 0) and (one.attack_labels(y) == 0).all()


def test_clean_label_poisons_only_the_target_class_and_keeps_labels():
    """SIG's poisoning: theta of the target class's samples carry the trigger; no label changes."""
    y = labels()
    p = Poisoner(y, 0.5, 3, "deterministic", seed=0, num_classes=10, clean_label=True)
    m = p.mask_for_epoch()
    assert bool(m.any()) and (y[m] == 3).all()
    frac = int(m.sum()) / int((y == 3).sum())
    assert abs(frac - 0.5) < 0.06
    assert torch.equal(p.poisoned_labels(m), y)
    assert torch.equal(p.attack_set(y), y != 3) and (p.attack_labels(y) == 3).all()  # test: other classes -> 3
    import pytest

    with pytest.raises(ValueError, match="clean-label attack is all-to-one"):
        Poisoner(y, 0.5, 3, "deterministic", 0, 10, "all-to-all", clean_label=True)


def test_cover_samples_carry_the_trigger_with_their_own_label():
    """The adaptive attack: about ``cover`` of the eligible non-poisoned samples carry the trigger, keep
    their labels, and are the same samples whatever the poison mask of the epoch (per index)."""
    y = labels()
    p = Poisoner(y, 0.1, 0, "deterministic", seed=2, num_classes=10, cover=0.2)
    m = p.mask_for_epoch()
    carry = p.carriers(m)
    cover = carry & ~m
    assert bool((carry & m).eq(m).all())  # every poisoned sample carries it
    assert not bool((cover & (y == 0)).any())  # cover samples are eligible (non-target) ones
    frac = int(cover.sum()) / int((p.eligible & ~m).sum())
    assert abs(frac - 0.2) < 0.03
    assert torch.equal(p.poisoned_labels(m)[cover], y[cover])  # labels kept
    s = Poisoner(y, 0.1, 0, "stochastic", seed=2, num_classes=10, cover=0.2)
    a, b = s.mask_for_epoch(), s.mask_for_epoch()
    fixed = s.carriers(torch.zeros_like(a))
    assert torch.equal(s.carriers(a) & ~a, fixed & ~a) and torch.equal(s.carriers(b) & ~b, fixed & ~b)
    assert torch.equal(Poisoner(y, 0.1, 0, "deterministic", seed=2).carriers(m), m)  # no cover: the poisons only
    none = Poisoner(y, 0.0, 0, "deterministic", seed=2, num_classes=10, cover=0.2)
    assert not bool(none.carriers(none.mask_for_epoch()).any())  # theta 0: no attack, no cover: a clean model
