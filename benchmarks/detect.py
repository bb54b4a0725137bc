"""Cost of the detection statistics and of each baseline, in epochs of training the same model.

One run on real digits (the default trial: small CNN, square trigger, theta 0.1): trains a few
epochs (the epoch time is their median), computes the spectrum, then times every cheap detector
(``trainables.detection.statistics.DETECTORS``) and every baseline (``trainables.detection.baselines.BASELINES``) on the
finished model, each the best of ``--repeats`` calls. Target (issue 10): the cheap statistics
together cost <= 0.5 epoch-equivalents on top of the spectrum.

    python benchmarks/detect.py [--device cpu|cuda] [--epochs 3] [--repeats 2]
"""

from __future__ import annotations

import statistics

import torch
from common import device_parser, header, print_table, timed

from trainables.config import TrialConfig
from trainables.detection.baselines import BASELINES
from trainables.detection.context import ACCESS
from trainables.detection.statistics import DETECTORS
from trainables.training.train import Trial


def main() -> None:
    ap = device_parser(__doc__)
    ap.add_argument("--epochs", type=int, default=3, help="training epochs timed (and trained) before detection")
    ap.add_argument("--repeats", type=int, default=2, help="calls per detector; the best is kept")
    args = ap.parse_args()
    device = torch.device(args.device)
    header(device)
    cfg = TrialConfig(trigger="square", theta=0.1, epochs=15, device=str(device), detect_baselines="nc,ss,ac")
    trial = Trial(cfg)
    epoch_times = [trial.train_epoch()["epoch_seconds"] for _ in range(args.epochs)]
    epoch = statistics.median(epoch_times)
    spec = timed(lambda: trial.spectrum(classes=True), device)  # as Trial.analyze asks it
    metrics, vecs, overlaps = trial.spectrum(classes=True)
    trial.keep_spectrum(metrics, vecs, overlaps)  # the exact trace and per-class spectra, as analyze keeps them
    ctx = trial.detection_context(access=ACCESS)  # every input, built once outside the timings
    ctx.train_features  # noqa: B018 - cached on the context
    path = trial.hessian_info["method_used"]  # auto: exact for the CNN on digits
    rows = [(f"spectrum (top-5, {path} path, {cfg.hessian_samples} samples)", spec / epoch, "-", f"{spec:.2f}s")]
    cheap, issue10 = 0.0, 0.0
    for name, entry in DETECTORS.items():
        s = timed(lambda fn=entry.fn: fn(ctx), device, args.repeats)
        cheap += s
        issue10 += s if name in ("spectral", "localisation", "flip") else 0.0
        rows.append((f"detect: {name}", s / epoch, "-", f"{s:.3f}s"))
    rows.append(
        ("detect: spectral + localisation + flip (issue 10's set)", issue10 / epoch, "<= 0.5", f"{issue10:.3f}s")
    )
    rows.append(("detect: all cheap statistics (with per-class curvature)", cheap / epoch, "-", f"{cheap:.3f}s"))
    feats = timed(lambda: trial.detection_context(access=("training-set",)).train_features, device, args.repeats)
    rows.append(("penultimate features of the training set (SS, AC)", feats / epoch, "-", f"{feats:.3f}s"))
    for name, entry in BASELINES.items():
        s = timed(lambda fn=entry.fn: fn(ctx), device, args.repeats)
        rows.append((f"baseline: {name}", s / epoch, "-", f"{s:.2f}s"))
    print(
        f"one training epoch (digits, {len(trial.data.train_y)} images, batch {cfg.batch_size}): median "
        f"{epoch:.2f}s of {[round(t, 2) for t in epoch_times]}; ratios below are in epochs"
    )
    print(
        f"nc: {cfg.nc_steps} steps x {cfg.num_classes} classes x {cfg.nc_batch_size} images; flip: "
        f"{len(vecs)} eigenvectors + {len(vecs)} random x 2 signs x {len(ctx.settings.norms)} norms "
        f"x {len(ctx.heldout[1])} held-out images; trace: {cfg.detect_probes} probe pass(es) over "
        f"{min(cfg.detect_trace_samples, cfg.hessian_samples)} samples"
    )
    print_table(rows)


if __name__ == "__main__":
    main()
