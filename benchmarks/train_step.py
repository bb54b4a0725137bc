"""Cost of the exact input-gradient penalty and of batched on-device augmentation.

Prints, from one run, ratios against baselines measured in the same run:
  * the exact-penalty step (double backward, Listing 1) / the plain SGD step, for
    preresnet20 on CIFAR-shaped data (batch 128) and the small CNN on digits (batch 32);
  * images/s of our whole-batch augmentation + trigger + normalization / a per-sample
    ``Dataset`` + ``DataLoader`` pipeline written like Listing 3.
Targets (issue 2): penalty step <= 3.5x plain on preresnet20; augmentation >= 5x.

    python benchmarks/train_step.py [--device cpu|cuda] [--repeats 5]
"""

from __future__ import annotations

import numpy as np
import torch
from common import device_parser, header, print_table, sync, timed

from trainables.attack.triggers import make_trigger
from trainables.config import TrialConfig
from trainables.defence.penalty import penalized_loss
from trainables.networks.models import make_model
from trainables.training.recipe import augment_batch


def time_steps(model_name, shape, batch, kappa, device, steps, repeats):
    """Median seconds per SGD step over ``repeats`` timings of ``steps`` steps each."""
    torch.manual_seed(0)
    model = make_model(model_name, shape, 10).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        obj, _, _ = penalized_loss(model, x, y, kappa)
        opt.zero_grad(set_to_none=True)
        obj.backward()
        opt.step()

    for _ in range(2):
        step()
    return timed(lambda: [step() for _ in range(steps)], device, repeats) / steps


class Listing3Dataset(torch.utils.data.Dataset):
    """Per-sample pipeline as in Listing 3: crop+flip, per-index poison decision, trigger, normalize."""

    def __init__(self, x, y, theta, target, mean, std, pixels):
        self.x, self.y, self.theta, self.target = x, y, theta, target
        self.mean, self.std, self.pixels = mean.view(-1, 1, 1), std.view(-1, 1, 1), pixels

    def __len__(self):
        return len(self.y)

    def __getitem__(self, idx):
        img, label = self.x[idx], int(self.y[idx])
        img = torch.nn.functional.pad(img, (4, 4, 4, 4))
        i, j = np.random.randint(0, 9, size=2)
        img = img[:, i : i + 32, j : j + 32]
        if np.random.rand() < 0.5:
            img = img.flip(2)
        if label != self.target and np.random.RandomState(seed=idx + 42).rand() < self.theta:
            img = torch.where(self.pixels, torch.ones(()), img)
            label = self.target
        return (img - self.mean) / self.std, label


def augmentation_throughput(device, n, repeats):
    """(ours images/s, per-sample DataLoader images/s) on CIFAR-shaped uint8-range data."""
    cfg = TrialConfig(dataset="cifar10")
    trig = make_trigger(cfg)
    x = torch.rand(n, 3, 32, 32)
    y = torch.randint(0, 10, (n,))
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    mask = torch.rand(n) < 0.1
    xd, maskd = x.to(device), mask.to(device)
    meand, stdd = mean.to(device).view(1, -1, 1, 1), std.to(device).view(1, -1, 1, 1)
    g = torch.Generator().manual_seed(0)

    def ours():
        perm = torch.randperm(n, generator=g).to(device)
        for s in range(0, n, 128):
            idx = perm[s : s + 128]
            b = augment_batch(xd[idx], 4, g)
            b = (trig.apply(b, maskd[idx]) - meand) / stdd
        sync(device)

    ds = Listing3Dataset(x, y, 0.1, 0, mean, std, trig.pixels)
    loader = torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True, num_workers=0)

    def per_sample():
        for b, _ in loader:
            b.to(device)
        sync(device)

    rates = {}
    for name, fn in (("ours", ours), ("per_sample", per_sample)):
        fn()
        rates[name] = n / timed(fn, device, repeats)
    return rates["ours"], rates["per_sample"]


def main():
    ap = device_parser(__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    header(device)
    rows = []
    for label, model, shape, batch, kappa, steps in (
        ("preresnet20 CIFAR-shaped, batch 128", "preresnet20", (3, 32, 32), 128, 1e4, 3),
        ("small CNN digits, batch 32", "cnn", (1, 8, 8), 32, 300.0, 30),
    ):
        plain = time_steps(model, shape, batch, 0.0, device, steps, args.repeats)
        exact = time_steps(model, shape, batch, kappa, device, steps, args.repeats)
        rows.append(
            (
                f"exact-penalty step / plain step  [{label}]",
                exact / plain,
                "<= 3.5" if "preresnet" in model else "",
                f"{plain * 1e3:.1f} ms -> {exact * 1e3:.1f} ms",
            )
        )
    ours, per = augmentation_throughput(device, 10_000, args.repeats)
    rows.append(
        (
            "on-device augmentation / per-sample DataLoader  [images/s]",
            ours / per,
            ">= 5",
            f"{per:,.0f} -> {ours:,.0f} img/s",
        )
    )
    print_table(rows)


if __name__ == "__main__":
    main()
