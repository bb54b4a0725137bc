"""Backdoor triggers as pure batched functions on ``(B, C, H, W)`` images in ``[0, 1]``.

Each trigger also yields its *direction*: a unit-norm, zero-mean ``(C, H, W)`` tensor in
the normalized input space against which Hessian eigenvectors are compared (Listing 7).
For the additive triggers this is Listing 2's mask; for the warp and the blend, the
normalized mean of ``triggered - clean`` over a fixed sample of training images.

Patch triggers take an ``amplitude`` a in (0, 1] (the trigger pixels become ``(1-a) x + a``)
and the blend trigger a strength alpha: walking either toward 0 moves the poison toward the
near-clone regime of Section 3.3, where efficacy can survive while the curvature spike vanishes.

The registry :data:`TRIGGERS` (name -> :class:`TriggerEntry`) is read by config validation, the
CLI's help and every trial. This module imports torch only inside the functions that need it, so
the registry's names cost nothing to read (``sweeper --help``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainables.plugins import load_plugins

if TYPE_CHECKING:  # torch loads when a trigger is first built: the registry's names are cheap to read
    import torch


def lshape_pixels(h: int, w: int, margin: int = 3, size: int = 2) -> torch.Tensor:
    """Boolean (H, W) map of Listing 2's L-shape: the arms cross at the centre pixel of the block."""
    import torch

    ys = slice(margin, margin + size)
    xs = slice(w - margin - size, w - margin)
    cy = (ys.start + ys.stop - 1) // 2
    cx = (xs.start + xs.stop - 1) // 2
    pix = torch.zeros(h, w, dtype=torch.bool)
    pix[ys, cx] = True  # vertical arm
    pix[cy, xs] = True  # horizontal arm
    return pix


def square_pixels(h: int, w: int, margin: int = 1, size: int = 4) -> torch.Tensor:
    """Boolean (H, W) map of a size x size square, ``margin`` px from the lower-right corner (Sec. 4)."""
    import torch

    pix = torch.zeros(h, w, dtype=torch.bool)
    pix[h - margin - size : h - margin, w - margin - size : w - margin] = True
    return pix


def unit_direction(v: torch.Tensor) -> torch.Tensor:
    """Zero-mean, unit-norm copy of ``v`` (Listing 2's normalization, eps 1e-8)."""
    v = v - v.mean()
    return v / (v.norm() + 1e-8)


def mean_shift_direction(apply: Callable[[torch.Tensor], torch.Tensor], data) -> torch.Tensor:
    """A diffuse trigger's direction: the normalized mean of ``normalize(apply(x)) - normalize(x)`` over the
    first 512 training images (zero-mean, unit-norm, on the CPU)."""
    import torch

    x = data.train_x[:512]
    delta = data.normalize(apply(x)) - data.normalize(x)
    return unit_direction(delta.mean(dim=0).to(torch.float32).cpu())


def masked(out: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``out`` on the rows where ``mask`` is true, ``x`` elsewhere; ``out`` itself when there is no mask."""
    import torch

    return out if mask is None else torch.where(mask.view(-1, 1, 1, 1), out, x)


@dataclass
class PatchTrigger:
    """Moves the trigger pixels to 1.0 in every channel (Listings 2-3), by ``amplitude`` in (0, 1].

    The pixels become ``(1 - a) x + a``: a = 1 sets them to exactly 1.0 (the paper's trigger).
    """

    pixels: torch.Tensor  # (H, W) bool
    channels: int
    amplitude: float = 1.0

    def apply(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Triggered copy of ``x``; only rows where ``mask`` is true when a mask is given."""
        import torch

        where = self.pixels.to(x.device).view(1, 1, *self.pixels.shape)
        if mask is not None:
            where = where & mask.view(-1, 1, 1, 1)
        a = self.amplitude
        return torch.where(where, x * (1.0 - a) + a, x)  # 0 * x + 1 is exactly 1 at a = 1

    def direction(self, data=None) -> torch.Tensor:
        """Listing 2's mask: the pattern in every channel, zero-mean and unit-norm."""
        import torch

        mask = self.pixels.to(torch.float32).expand(self.channels, *self.pixels.shape)
        return unit_direction(mask.clone())


@dataclass
class WarpTrigger:
    """WaNet (Nguyen et al. 2021): a fixed smooth random warp of the whole image.

    The control grid is ``k x k`` uniform noise in [-1, 1] scaled to mean |.| = 1, upsampled
    bicubically to the image; the sampling grid is ``identity + strength * noise`` in
    grid_sample's [-1, 1] coordinates, so ``strength`` is the largest typical displacement as a
    fraction of the half-width (WaNet's ``s`` equals ``strength * H``; 0.02 on 32 px = 0.32 px).
    """

    grid: torch.Tensor  # (1, H, W, 2) sampling grid
    channels: int

    @classmethod
    def make(cls, h: int, w: int, channels: int, strength: float, k: int = 4, seed: int = 0) -> WarpTrigger:
        """Build the warp field deterministically from ``seed``."""
        import torch
        import torch.nn.functional as F

        g = torch.Generator().manual_seed(seed)
        ins = torch.rand(1, 2, k, k, generator=g, dtype=torch.float64) * 2 - 1
        ins = ins / ins.abs().mean()
        noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, h, dtype=torch.float64), torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij"
        )
        identity = torch.stack((xs, ys), dim=-1)[None]
        grid = (identity + strength * noise).clamp(-1, 1)
        return cls(grid=grid.to(torch.float32), channels=channels)

    def apply(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Warped copy of ``x``; only rows where ``mask`` is true when a mask is given."""
        import torch.nn.functional as F

        grid = self.grid.to(device=x.device, dtype=x.dtype)
        if mask is None:
            return F.grid_sample(x, grid.expand(x.shape[0], -1, -1, -1), align_corners=True)
        out = x.clone()
        idx = mask.nonzero().squeeze(1)
        if idx.numel():
            sel = x.index_select(0, idx)
            out[idx] = F.grid_sample(sel, grid.expand(sel.shape[0], -1, -1, -1), align_corners=True)
        return out

    def direction(self, data) -> torch.Tensor:
        """Normalized mean of ``normalize(warp(x)) - normalize(x)`` over the first 512 training images."""
        return mean_shift_direction(self.apply, data)


@dataclass
class BlendTrigger:
    """Blended attack (Chen et al. 2017): ``(1 - alpha) x + alpha P`` with a fixed random pattern P.

    P is uniform in [0, 1] per pixel and channel, drawn once from ``seed`` (shared by a sweep's
    trials like the warp field). Every pixel changes, so the trigger is diffuse, and its size
    ``alpha ||P - x||`` goes to zero with alpha: the near-clone control of Section 3.3.
    """

    pattern: torch.Tensor  # (C, H, W) in [0, 1]
    alpha: float

    @classmethod
    def make(cls, h: int, w: int, channels: int, alpha: float, seed: int = 0) -> BlendTrigger:
        """Build the pattern deterministically from ``seed``."""
        import torch

        g = torch.Generator().manual_seed(seed)
        return cls(pattern=torch.rand(channels, h, w, generator=g), alpha=alpha)

    def apply(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Blended copy of ``x``; only rows where ``mask`` is true when a mask is given."""

        p = self.pattern.to(device=x.device, dtype=x.dtype)[None]
        return masked(x * (1.0 - self.alpha) + p * self.alpha, x, mask)

    def direction(self, data) -> torch.Tensor:
        """Normalized mean of ``normalize(blend(x)) - normalize(x)`` over the first 512 training images."""
        return mean_shift_direction(self.apply, data)


@dataclass
class SignalTrigger:
    """SIG (Barni, Kallas and Tondi, ICIP 2019): a horizontal sinusoid added to the whole image,
    ``x + delta * sin(2 pi f j / W)`` at column j of every row and channel, clipped to [0, 1].

    A clean-label attack (:attr:`TriggerEntry.clean_label`): only target-class training images carry the
    signal and their labels stay; at test time images of other classes get it. The same ``delta`` is used
    for training and test (the paper may raise it at test time; we do not).
    """

    signal: torch.Tensor  # (W,) delta * sin(2 pi f j / W)

    @classmethod
    def make(cls, w: int, delta: float, frequency: int) -> SignalTrigger:
        """The signal of an image ``w`` columns wide."""
        import math

        import torch

        j = torch.arange(w, dtype=torch.float64)
        return cls(signal=(delta * torch.sin(2 * math.pi * frequency * j / w)).to(torch.float32))

    def apply(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Copy of ``x`` with the signal added and clipped; only rows where ``mask`` is true when given."""
        return masked((x + self.signal.to(device=x.device, dtype=x.dtype)).clamp(0.0, 1.0), x, mask)

    def direction(self, data) -> torch.Tensor:
        """Normalized mean of ``normalize(sig(x)) - normalize(x)`` over the first 512 training images."""
        return mean_shift_direction(self.apply, data)


Trigger = PatchTrigger | WarpTrigger | BlendTrigger | SignalTrigger


@dataclass(frozen=True)
class TriggerEntry:
    """A trigger in the registry: how a config builds it, its default geometry and its own parameters.

    ``params`` declares fields the trigger reads beyond the built-in ones, each with
    :func:`trainables.fields.field` (default, constraint, help): they become fields of every network
    trial (``cfg.<name>``), with validation, ``sweeper trial --<name>``, ``--set`` and the records
    derived from that one declaration, and they are part of the threat (group ``attack``). ``clean_label``
    says which training images carry it (:class:`trainables.attack.poison.Poisoner`).
    """

    name: str
    build: Callable[[Any], Trigger]  # TrialConfig -> Trigger
    size_margin: Callable[[bool], tuple[int, int]] = lambda small: (2, 0 if small else 3)  # px; small: 8x8 images
    params: dict[str, Any] = field(default_factory=dict)  # name -> trainables.fields.field(...)
    # clean-label: poison target-class training images and keep their labels (theta is then the fraction of the
    # target class that carries the trigger); else dirty-label: other classes' images relabelled
    clean_label: bool = False


TRIGGERS: dict[str, TriggerEntry] = {}


def register_trigger(entry: TriggerEntry) -> TriggerEntry:
    """Add a trigger: config validation, its default size/margin, its parameters, the CLI and every trial read this."""
    if entry.params:
        from trainables.fields import register_fields

        register_fields(f"trigger {entry.name}", entry.params, group="attack")
    TRIGGERS[entry.name] = entry
    return entry


def make_trigger(cfg) -> Trigger:
    """The trigger a :class:`~trainables.config.TrialConfig` asks for (by its registry name)."""
    load_plugins()  # triggers registered by SWEEPER_PLUGINS / entry points (once per process)
    if cfg.trigger not in TRIGGERS:
        raise ValueError(f"trigger={cfg.trigger!r} is invalid: must be one of {', '.join(TRIGGERS)}")
    return TRIGGERS[cfg.trigger].build(cfg)


def _patch(pixels):
    def build(cfg) -> Trigger:
        c, h, w = cfg.image_shape
        return PatchTrigger(
            pixels(h, w, cfg.trigger_margin, cfg.trigger_size), c, getattr(cfg, "trigger_amplitude", 1.0)
        )

    return build


register_trigger(TriggerEntry("lshape", _patch(lshape_pixels)))  # Listing 2: arm 2, margin 3 (0 on 8x8)
register_trigger(
    TriggerEntry(
        "square",
        _patch(square_pixels),  # Sec. 4: 4x4, 1 px from the corner (2x2, 0 on 8x8)
        lambda small: (2, 0) if small else (4, 1),
    )
)
register_trigger(
    TriggerEntry(
        "warp",
        lambda cfg: WarpTrigger.make(
            cfg.image_shape[1], cfg.image_shape[2], cfg.image_shape[0], cfg.warp_strength, cfg.warp_grid, cfg.warp_seed
        ),
    )
)
register_trigger(
    TriggerEntry(
        "blend",
        lambda cfg: BlendTrigger.make(
            cfg.image_shape[1], cfg.image_shape[2], cfg.image_shape[0], cfg.blend_alpha, cfg.blend_seed
        ),
    )
)
register_trigger(
    TriggerEntry(
        "sig",
        lambda cfg: SignalTrigger.make(cfg.image_shape[2], cfg.sig_delta, cfg.sig_frequency),
        clean_label=True,  # Barni et al.: target-class images only, labels unchanged
    )
)
