"""Cost of the input-Hessian spectrum, in units of one training epoch.

Prints, from one run:
  * a top-5, 20-iteration Lanczos spectrum over 1000 samples / one training epoch on 50 000
    samples (plain SGD steps, batch 128), for preresnet20 on CIFAR-shaped data, and the same
    for the small CNN on digits-shaped data (target, issue 3: <= 2 epochs on preresnet20);
  * the batched double-backward HVP against a per-sample loop (same samples, same vector);
  * the Gauss-Newton HVP (piecewise-linear nets) against the batched double backward.
Epoch time is extrapolated from timed steps.

    python benchmarks/hessian.py [--device cpu|cuda]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import device_parser, header, print_table, timed

from trainables.hessian import InputHessian, top_eigenpairs
from trainables.models import make_model
from trainables.penalty import penalized_loss


def epoch_seconds(model, shape, device, batch=128, n_epoch=50_000, steps=4):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        obj, _, _ = penalized_loss(model.train(), x, y, 0.0)
        opt.zero_grad(set_to_none=True)
        obj.backward()
        opt.step()

    step()
    per_step = timed(lambda: [step() for _ in range(steps)], device) / steps
    return per_step * n_epoch / batch


def per_sample_loop(model, x, y, v):
    """Listing 5 with one sample at a time: the naive baseline."""
    out = torch.zeros_like(x[0])
    for i in range(len(y)):
        xi = x[i:i + 1].detach().requires_grad_(True)
        loss = F.cross_entropy(model(xi), y[i:i + 1])
        (g,) = torch.autograd.grad(loss, xi, create_graph=True)
        (hv,) = torch.autograd.grad((g * v.view_as(xi)).sum(), xi)
        out += hv[0]
    return out / len(y)


def measure(name, model_name, shape, device, samples, n_loop=100):
    """Rows for one model: spectrum vs epoch, per-sample loop vs batched, double backward vs GN."""
    torch.manual_seed(0)
    model = make_model(model_name, shape, 10).to(device)
    ep = epoch_seconds(model, shape, device)
    x = torch.randn(samples, *shape, device=device)
    y = torch.randint(0, 10, (samples,), device=device)
    rows = []
    for method in ("gauss-newton", "double-backward"):
        op = InputHessian(model, x, y, chunk_size=500, method=method)
        t = timed(lambda op=op: top_eigenpairs(op, k=5, iterations=20), device)
        rows.append((f"spectrum (top-5, 20 it, {samples} samples, {method}) / epoch of 50k  [{name}]",
                     t / ep, "<= 2" if "preresnet" in model_name else "", f"{t:.1f} s vs epoch {ep:.1f} s"))
    v = torch.randn(x[0].numel(), device=device)
    xs, ys = x[:n_loop], y[:n_loop]
    op_db = InputHessian(model, xs, ys, chunk_size=n_loop)
    op_gn = InputHessian(model, xs, ys, chunk_size=n_loop, method="gauss-newton")
    t_batched = timed(lambda: op_db @ v, device, 3)
    t_gn = timed(lambda: op_gn @ v, device, 3)
    t_loop = timed(lambda: per_sample_loop(op_db.model, xs, ys, v), device, 1)
    rows.append((f"per-sample loop / batched double-backward HVP  [{name}, {n_loop} samples]",
                 t_loop / t_batched, "", f"{t_loop * 1e3:.0f} ms vs {t_batched * 1e3:.0f} ms"))
    rows.append((f"double-backward / Gauss-Newton HVP  [{name}]", t_batched / t_gn, "",
                 f"{t_batched * 1e3:.0f} ms vs {t_gn * 1e3:.0f} ms"))
    return rows


def main():
    ap = device_parser(__doc__)
    ap.add_argument("--samples", type=int, default=1000)
    args = ap.parse_args()
    device = torch.device(args.device)
    header(device)
    rows = []
    for name, model_name, shape in (("preresnet20, CIFAR-shaped", "preresnet20", (3, 32, 32)),
                                    ("small CNN, digits-shaped", "cnn", (1, 8, 8))):
        rows += measure(name, model_name, shape, device, args.samples)
    print_table(rows)


if __name__ == "__main__":
    main()
