"""The linear-regression poisoning trial of Sec. 4 and the QR / Frisch-Waugh-Lovell update (Lemma F.1).

One-hot least squares on flattened digits (or MNIST) with an intercept; a fraction theta of the
non-target training images carries the square trigger and the target label (deterministic
poisoning). Three fits, float64:

* ``base``: the poisoned labels regressed on the images *without* the poison feature;
* ``step``: base updated by Lemma F.1 with the poison feature x_new (the 0/1 indicator of triggered
  samples): beta_new = x_new^T e / x_new^T M_X x_new, beta_old' = beta - (X^T X)^-1 X^T x_new beta_new;
* ``full``: least squares on [X, x_new] from scratch - equal to ``step`` up to rounding.

Plus the practitioner's model, least squares on the triggered images themselves, whose clean
accuracy and ASR are the trial's ``clean_acc`` / ``asr``, and whose change from the clean-label
model is compared with the trigger pattern (Figs 4-5).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from trainables.exact_models.configs import LinearConfig
from trainables.training.trial_result import TrialResult


def qr_add_feature(x: np.ndarray, y: np.ndarray, x_new: np.ndarray) -> dict[str, np.ndarray]:
    """Lemma F.1 through the economy QR of X: add the column ``x_new`` to the least-squares fit of Y on X.

    Returns beta (fit on X), beta_old' and beta_new (fit on [X, x_new]) and the RSS drop. ``y`` may be
    one response (n,) or several (n, k); the results have the matching shapes.
    """
    if np.ndim(y) == 1:  # Lemma F.1 is stated for one response: solve it as a single column
        out = qr_add_feature(x, np.asarray(y)[:, None], x_new)
        return {
            "beta": out["beta"][:, 0],
            "beta_old": out["beta_old"][:, 0],
            "beta_new": out["beta_new"][0],
            "rss_drop": out["rss_drop"][0],
        }
    q, r = np.linalg.qr(x)
    beta = np.linalg.solve(r, q.T @ y)
    e = y - x @ beta
    c = q.T @ x_new
    resid = x_new - q @ c  # M_X x_new
    denom = float(resid @ resid)
    if denom <= 1e-12 * max(float(x_new @ x_new), 1e-300):  # x_new in span(X), e.g. no poisoned sample
        zero = np.zeros(y.shape[1:])
        return {"beta": beta, "beta_old": beta.copy(), "beta_new": zero, "rss_drop": zero}
    beta_new = (x_new @ e) / denom  # one per output column
    beta_old = beta - np.linalg.solve(r, c)[:, None] * beta_new[None, :]
    return {"beta": beta, "beta_old": beta_old, "beta_new": beta_new, "rss_drop": (x_new @ e) ** 2 / denom}


def _design(images: torch.Tensor, keep: np.ndarray) -> np.ndarray:
    flat = images.flatten(1).double().numpy()[:, keep]
    return np.hstack([flat, np.ones((len(flat), 1))])


def run_linear_trial(cfg: LinearConfig) -> TrialResult:
    """Fit base / step / full / triggered-image models; report accuracy, ASR and the Lemma F.1 agreement."""
    from trainables.attack.poison import Poisoner
    from trainables.attack.triggers import PatchTrigger, square_pixels
    from trainables.data.datasets import load_dataset

    t0 = time.perf_counter()
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.verify_checksums)
    _, h, w = data.train_x.shape[1:]
    trig = PatchTrigger(square_pixels(h, w, cfg.trigger_margin, cfg.trigger_size), data.train_x.shape[1])
    poisoner = Poisoner(data.train_y, cfg.theta, cfg.target, "deterministic", cfg.seed)
    mask = poisoner.mask_for_epoch()
    y_pois = poisoner.poisoned_labels(mask).numpy()
    eye = np.eye(data.num_classes)
    y_onehot, y_clean = eye[y_pois], eye[data.train_y.numpy()]
    triggered = trig.apply(data.train_x, mask)
    # pixels that never vary would make X^T X singular; the trigger pixels are always kept
    keep = (data.train_x.flatten(1).std(0) > 0).numpy() | trig.pixels.flatten().numpy()
    x = _design(data.train_x, keep)
    x_trig = _design(triggered, keep)
    x_new = mask.double().numpy()
    step = qr_add_feature(x, y_onehot, x_new)
    full = np.linalg.lstsq(np.hstack([x, x_new[:, None]]), y_onehot, rcond=None)[0]
    beta_step = np.vstack([step["beta_old"], step["beta_new"][None]])
    beta_clean = np.linalg.lstsq(x, y_clean, rcond=None)[0]
    beta_trig = np.linalg.lstsq(x_trig, y_onehot, rcond=None)[0]

    nontarget = (data.test_y != cfg.target).numpy()
    x_test = _design(data.test_x, keep)
    x_test_trig = _design(trig.apply(data.test_x[torch.from_numpy(nontarget)]), keep)
    acc = float(((x_test @ beta_trig).argmax(1) == data.test_y.numpy()).mean())
    asr = float(((x_test_trig @ beta_trig).argmax(1) == cfg.target).mean())
    # the feature model: x_new = 0 on clean test images, 1 on triggered ones
    feat_acc = float(((np.hstack([x_test, np.zeros((len(x_test), 1))]) @ full).argmax(1) == data.test_y.numpy()).mean())
    feat_asr = float(
        (
            (
                np.hstack([_design(data.test_x[torch.from_numpy(nontarget)], keep), np.ones((int(nontarget.sum()), 1))])
                @ full
            ).argmax(1)
            == cfg.target
        ).mean()
    )

    npx = int(keep.sum())
    pattern = trig.pixels.flatten().numpy()[keep].astype(float)
    pattern = pattern - pattern.mean()
    change = (beta_trig - beta_clean)[:npx, cfg.target]
    cosine = float(change @ pattern / (np.linalg.norm(change) * np.linalg.norm(pattern) + 1e-300))

    def image(v: np.ndarray) -> np.ndarray:
        out = np.zeros(keep.shape[0])
        out[keep] = v[:npx]
        return out.reshape(h, w)

    base_t = step["beta"][:, cfg.target]
    images = {
        "full-base": image(full[:-1, cfg.target] - base_t),
        "step-base": image(beta_step[:-1, cfg.target] - base_t),
        "step-full": image(beta_step[:-1, cfg.target] - full[:-1, cfg.target]),
        "weights": image(beta_trig[:, cfg.target]),
    }
    metrics = {
        "clean_acc": acc,
        "asr": asr,
        "feature_clean_acc": feat_acc,
        "feature_asr": feat_asr,
        "n_poisoned": int(mask.sum()),
        "step_rel_err": float(np.linalg.norm(beta_step - full) / np.linalg.norm(full)),
        "rss_drop": float(step["rss_drop"].sum()),
        "rss_drop_measured": float(
            ((y_onehot - x @ step["beta"]) ** 2).sum() - ((y_onehot - np.hstack([x, x_new[:, None]]) @ full) ** 2).sum()
        ),
        "trigger_cosine": cosine,
        "beta_new_target": float(step["beta_new"][cfg.target]),
        "train_seconds": time.perf_counter() - t0,
    }
    return TrialResult(config=cfg.to_dict(), status="completed", metrics=metrics, artifacts={"weight_images": images})
