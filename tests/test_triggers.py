import torch

from trainables.attack.triggers import (
    BlendTrigger,
    PatchTrigger,
    WarpTrigger,
    lshape_pixels,
    make_trigger,
    square_pixels,
)
from trainables.config import TrialConfig
from trainables.data.images import load_digits


def listing2_mask(size_img=32, channels=3, margin=3, size=2):
    """Listing 2 of the paper, verbatim."""
    mask = torch.zeros(channels, size_img, size_img)
    ys = slice(margin, margin + size)
    xs = slice(size_img - margin - size, size_img - margin)
    cy = (ys.start + ys.stop - 1) // 2
    cx = (xs.start + xs.stop - 1) // 2
    mask[:, ys, cx] = 1.0
    mask[:, cy, xs] = 1.0
    mask -= mask.mean()
    mask /= mask.norm() + 1e-8
    return mask


def listing3_apply(img, margin=3, size=2):
    """Listing 3's _apply_poison, verbatim (on a (C, H, W) image)."""
    img = img.clone()
    _, H, W = img.shape
    ys = slice(margin, margin + size)
    xs = slice(W - margin - size, W - margin)
    cy = (ys.start + ys.stop - 1) // 2
    cx = (xs.start + xs.stop - 1) // 2
    img[:, ys, cx] = 1.0
    img[:, cy, xs] = 1.0
    return img


def test_lshape_equals_listings_2_and_3_on_32_and_28_px():
    for size_img, channels, dataset in ((32, 3, "cifar10"), (28, 1, "mnist")):
        trig = make_trigger(TrialConfig(dataset=dataset))
        torch.testing.assert_close(trig.direction(), listing2_mask(size_img, channels), rtol=0, atol=1e-7)
        imgs = torch.rand(5, channels, size_img, size_img)
        out = trig.apply(imgs)
        for i in range(5):
            assert torch.equal(out[i], listing3_apply(imgs[i]))


def test_lshape_pixel_positions_32px():
    pix = lshape_pixels(32, 32)
    assert sorted(map(tuple, pix.nonzero().tolist())) == [(3, 27), (3, 28), (4, 27)]


def test_mask_selects_rows_and_leaves_others_untouched():
    trig = PatchTrigger(square_pixels(28, 28, 1, 4), 1)
    x = torch.rand(6, 1, 28, 28)
    mask = torch.tensor([True, False, True, False, False, True])
    out = trig.apply(x, mask)
    assert torch.equal(out[~mask], x[~mask])
    assert (out[mask][:, :, 23:27, 23:27] == 1).all()
    assert torch.equal(out[mask][:, :, :23], x[mask][:, :, :23])


def test_directions_are_unit_norm_and_zero_mean():
    data = load_digits()
    for trig_name in ("lshape", "square", "warp", "blend"):
        d = make_trigger(TrialConfig(trigger=trig_name)).direction(data)
        assert d.shape == (1, 8, 8)
        assert abs(float(d.norm()) - 1) < 1e-5 and abs(float(d.mean())) < 1e-6


def test_warp_is_deterministic_small_and_batched():
    a = WarpTrigger.make(32, 32, 3, 0.02, 4, seed=0)
    b = WarpTrigger.make(32, 32, 3, 0.02, 4, seed=0)
    assert torch.equal(a.grid, b.grid)
    # smooth natural-ish images: a sub-pixel warp barely changes them
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4), size=(32, 32), mode="bilinear", align_corners=True)
    out = a.apply(x)
    assert out.shape == x.shape
    assert 0 < float((out - x).abs().mean()) < 0.01  # imperceptible but not nothing
    strong = WarpTrigger.make(32, 32, 3, 0.2, 4, seed=0).apply(x)
    assert float((strong - x).abs().mean()) > 3 * float((out - x).abs().mean())
    # masked rows equal the unmasked warp of the same rows
    mask = torch.tensor([False, True, True, False])
    torch.testing.assert_close(a.apply(x, mask)[mask], out[mask])
    assert torch.equal(a.apply(x, mask)[~mask], x[~mask])
    # a near-zero strength is the identity warp
    ident = WarpTrigger.make(32, 32, 3, 1e-9, 4, seed=0)
    torch.testing.assert_close(ident.apply(x), x, atol=1e-5, rtol=0)


def test_patch_amplitude_mixes_toward_one_and_keeps_the_direction():
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    full = make_trigger(TrialConfig(trigger="square"))
    half = make_trigger(TrialConfig(trigger="square", trigger_amplitude=0.5))
    pix = full.pixels
    torch.testing.assert_close(half.apply(x)[:, :, pix], (x[:, :, pix] + 1) / 2)
    assert torch.equal(half.apply(x)[:, :, ~pix], x[:, :, ~pix])
    assert (full.apply(x)[:, :, pix] == 1).all()
    torch.testing.assert_close(half.direction(), full.direction())


def test_blend_is_seeded_masked_and_vanishes_with_alpha():
    a = BlendTrigger.make(8, 8, 3, 0.2, seed=0)
    assert torch.equal(a.pattern, BlendTrigger.make(8, 8, 3, 0.2, seed=0).pattern)
    assert not torch.equal(a.pattern, BlendTrigger.make(8, 8, 3, 0.2, seed=1).pattern)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.apply(x), 0.8 * x + 0.2 * a.pattern)
    mask = torch.tensor([True, False, False, True])
    out = a.apply(x, mask)
    assert torch.equal(out[~mask], x[~mask])
    torch.testing.assert_close(out[mask], a.apply(x)[mask])
    tiny = BlendTrigger.make(8, 8, 3, 1e-6, seed=0)
    assert float((tiny.apply(x) - x).abs().max()) < 3e-6  # the near-clone end of the walk (float32 rounding)
    assert float((BlendTrigger.make(8, 8, 3, 1.0, seed=0).apply(x) - a.pattern).abs().max()) < 1e-6


def test_sig_adds_a_horizontal_sinusoid_clipped_and_masked():
    """SIG (Barni et al. 2019): x + delta sin(2 pi f j / W) at column j, every row and channel, clipped."""
    import math

    from trainables.attack.triggers import TRIGGERS, SignalTrigger
    from trainables.config import TrialConfig

    t = SignalTrigger.make(32, 0.1, 6)
    x = torch.full((2, 3, 32, 32), 0.5)
    out = t.apply(x)
    want = 0.5 + 0.1 * torch.sin(2 * math.pi * 6 * torch.arange(32, dtype=torch.float64) / 32)
    assert torch.allclose(out[0, 1, 7].double(), want, atol=1e-6) and torch.equal(out[:, :, 0], out[:, :, 31])
    assert t.apply(torch.ones(1, 1, 32, 32)).max() == 1.0 and t.apply(torch.zeros(1, 1, 32, 32)).min() == 0.0
    masked = t.apply(x, torch.tensor([False, True]))
    assert torch.equal(masked[0], x[0]) and torch.equal(masked[1], out[1])
    assert TRIGGERS["sig"].clean_label and not TRIGGERS["square"].clean_label
    assert TrialConfig(trigger="sig").sig_frequency == 2  # 6 periods alias on 8 columns
    assert TrialConfig(trigger="sig", dataset="digits", sig_frequency=3).sig_frequency == 3
