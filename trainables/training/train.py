"""One trial: poison the training set, train with the input-gradient penalty, evaluate.

:class:`Trial` owns every piece of state (data on the device, model, optimizer, poisoner,
RNGs) and advances one epoch at a time, so a driver (the CLI, a Ray Tune trainable) can
report and checkpoint between epochs; :func:`run_trial` is the plain loop over it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainables.attack.poison import Poisoner
from trainables.attack.triggers import TRIGGERS, make_trigger
from trainables.config import SweeperError, TrialConfig
from trainables.data.datasets import dataset_params, load_dataset
from trainables.data.images import ImageData
from trainables.defence.penalty import penalized_loss, per_sample_input_grad_sq
from trainables.detection.filtering import FILTERS, removal_quality, select_removed
from trainables.fields import EXTRA_FIELDS
from trainables.networks.batching import forward_chunk
from trainables.networks.models import make_model
from trainables.spectrum.geometry import feature_geometry, features, geometry_summary
from trainables.spectrum.hessian import InputHessian, input_hessian_spectrum, plan_spectrum
from trainables.spectrum.spectra import spectrum_metrics
from trainables.training.optimizer import sgd
from trainables.training.recipe import augment_batch, lr_at
from trainables.training.runtime import resolve_device, torch_threads
from trainables.training.trial_result import TrialResult

if TYPE_CHECKING:
    from trainables.detection.context import DetectionContext

CHECKPOINT_VERSION = 1


class CheckpointError(SweeperError):
    """A checkpoint that cannot be resumed (another config, another version, unreadable)."""


class Trial:
    """A trial's full state, advanced epoch by epoch."""

    def __init__(self, cfg: TrialConfig, data: ImageData | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        if data is None:
            data = load_dataset(cfg.dataset, cfg.data_dir, cfg.verify_checksums, cfg.download, dataset_params(cfg))
            data = data.train_subset(cfg.train_subset)  # the same subset for every seed: one population
        self.data = data.to(self.device)
        self.trigger = make_trigger(cfg)
        self.direction = self.trigger.direction(self.data)  # (C, H, W) unit, zero-mean
        self.poisoner = Poisoner(
            self.data.train_y,
            cfg.theta,
            cfg.target,
            cfg.poison_mode,
            cfg.seed,
            cfg.num_classes,
            cfg.target_mode,
            TRIGGERS[cfg.trigger].clean_label,
            cfg.cover_fraction,
        )
        self.model = make_model(cfg.model, cfg.image_shape, cfg.num_classes).to(self.device)
        self.forward_batch = forward_chunk(cfg.eval_batch_size, self.device)  # images per evaluation pass
        if cfg.hessian:  # a method this model or budget cannot run is refused before training, not after
            self.hessian_plan()
        if cfg.defence_filter != "none":
            self._check_filter()
            # the retrain starts from these same weights (from scratch, the same seed): kept, not re-drawn
            self.initial_model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.optimizer = sgd(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # shuffling and augmentation
        self.epoch = 0  # epochs completed, both stages of a filtering defence counted (steps never repeat)
        self.keep: torch.Tensor | None = None  # training samples kept by a filtering defence (None: all)
        self.filter_report: dict[str, float] = {}  # pre_filter_* and filter_* metrics, once filtered
        self.history: list[dict[str, float]] = []
        self.status = "running"
        self.diverged_epoch: int | None = None
        self.last_mask: torch.Tensor | None = None  # poison mask of the last epoch trained
        self.analysis: dict[str, float] = {}  # final spectrum + geometry metrics, once analysed
        self.artifacts: dict[str, Any] = {}  # eigenvectors, eigenvalues, geometry rows
        self.hessian_info: dict[str, Any] = {}  # the spectrum path used last and why
        self.class_spectra: dict[str, Any] | None = None  # per-class spectra from the last exact spectrum (detection)
        # ASR: the triggered test images the attack wants elsewhere (never the target's own: all-to-one), sent
        # where it wants them (the target; (y + 1) mod K under all-to-all)
        counted = self.poisoner.attack_set(self.data.test_y)
        self.asr_x = self.data.normalize(self.trigger.apply(self.data.test_x[counted]))
        self.asr_y = self.poisoner.attack_labels(self.data.test_y[counted])
        self.test_x = self.data.normalize(self.data.test_x)

    @property
    def done(self) -> bool:
        """True once all epochs ran or training diverged."""
        return self.status != "running"

    @property
    def retraining(self) -> bool:
        """True in a filtering defence's second stage (the retrain on the kept samples)."""
        return self.keep is not None

    def _check_filter(self) -> None:
        """Refuse, before training, a filter this model or memory budget cannot run."""
        cfg = self.cfg
        entry = FILTERS[cfg.defence_filter]
        if entry.piecewise_linear and not getattr(self.model, "piecewise_linear", False):
            raise SweeperError(
                f"defence_filter={cfg.defence_filter!r} is invalid for model {cfg.model!r}: its scores need a "
                "piecewise-linear net (input Hessian J^T S J); valid for it: none, "
                + ", ".join(n for n, e in FILTERS.items() if not e.piecewise_linear)
            )
        why = entry.check(cfg, len(self.data.train_y)) if entry.check is not None else None
        if why:
            raise SweeperError(why)

    # ------------------------------------------------------------------ training
    def train_epoch(self) -> dict[str, float]:
        """One pass over the (re-)poisoned training set; returns the epoch's metrics."""
        cfg, data = self.cfg, self.data
        t0 = time.perf_counter()
        lr = lr_at(cfg, self.epoch - (cfg.epochs if self.retraining else 0))  # the schedule restarts with the retrain
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mask = self.poisoner.mask_for_epoch()
        self.last_mask = mask
        labels = self.poisoner.poisoned_labels(mask)
        carry = self.poisoner.carriers(mask)  # the poisoned samples, and the adaptive attack's cover samples
        if self.keep is None:
            perm = torch.randperm(len(labels), generator=self.generator).to(self.device)
        else:  # the retrain: the kept samples only
            kept = torch.nonzero(self.keep).flatten()
            perm = kept[torch.randperm(len(kept), generator=self.generator).to(self.device)]
        self.model.train()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # sample-weighted ce, penalty
        seen = 0
        for start in range(0, len(perm), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            x = data.train_x[idx]
            if cfg.augment:
                x = augment_batch(x, cfg.crop_padding, self.generator)
            x = data.normalize(self.trigger.apply(x, carry[idx]))  # trigger after augmentation (Listing 3)
            y = labels[idx]
            objective, ce, penalty = penalized_loss(self.model, x, y, cfg.kappa, cfg.penalty)
            if not torch.isfinite(objective):
                self.status, self.diverged_epoch = "diverged", self.epoch + 1
                break
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            self.optimizer.step()
            sums += torch.stack([ce.detach(), penalty.detach()]).double() * len(y)  # no host sync per step
            seen += len(y)
        self.epoch += 1
        n = max(seen, 1)
        metrics = {
            "epoch": self.epoch,
            "lr": lr,
            "train_loss": float(sums[0]) / n,
            "penalty": float(sums[1]) / n,
            "n_poisoned": int(mask.sum()) if self.keep is None else int((mask & self.keep).sum()),
        }
        if cfg.defence_filter != "none":
            metrics["stage"] = 2 if self.retraining else 1
        if self.status == "diverged":
            metrics.update(train_loss=math.nan, penalty=math.nan)
        else:
            in_stage = self.epoch - (cfg.epochs if self.retraining else 0)
            if in_stage % cfg.eval_every == 0 or in_stage == cfg.epochs:  # each training's last epoch: always
                metrics.update(self.evaluate(mask, labels))
            if self.epoch >= cfg.total_epochs:
                self.status = "completed"
            elif self.epoch == cfg.epochs and not self.retraining:  # a filtering defence: score, remove, retrain
                metrics.update(self.filter_and_restart(metrics))
            elif cfg.hessian and cfg.spectrum_every and self.epoch % cfg.spectrum_every == 0:
                spec, _, _ = self.spectrum()  # onset of visibility during training
                metrics.update(
                    {k: v for k, v in spec.items() if k.startswith(("lambda_1", "eig_gap", "overlap", "max_overlap"))}
                )
        metrics["epoch_seconds"] = time.perf_counter() - t0
        self.history.append(metrics)
        return metrics

    @torch.no_grad()
    def _accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if len(y) == 0:
            return math.nan
        b = self.forward_batch
        correct = torch.zeros((), dtype=torch.int64, device=self.device)  # one host sync, at the end
        for s in range(0, len(y), b):
            correct += (self.model(x[s : s + b]).argmax(1) == y[s : s + b]).sum()
        return int(correct) / len(y)

    def evaluate(self, mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> dict[str, float]:
        """clean_acc, asr, train_acc (on the poisoned training set as trained) and the input-Fisher trace."""
        data = self.data
        self.model.eval()
        if mask is None:
            mask = (
                self.poisoner.fixed
                if self.poisoner.fixed is not None
                else torch.zeros_like(data.train_y, dtype=torch.bool)
            )
            labels = self.poisoner.poisoned_labels(mask)
        train_x = data.normalize(self.trigger.apply(data.train_x, self.poisoner.carriers(mask)))
        if self.keep is not None:  # the samples trained on
            train_x, labels = train_x[self.keep], labels[self.keep]
        fx, fy = self.test_x[:1000], data.test_y[:1000]  # the Fisher's sample: the first 1000 test images
        b = self.forward_batch
        fisher = torch.cat(
            [per_sample_input_grad_sq(self.model, fx[s : s + b], fy[s : s + b]) for s in range(0, len(fy), b)]
        ).mean()
        return {
            "clean_acc": self._accuracy(self.test_x, data.test_y),
            "asr": self._accuracy(self.asr_x, self.asr_y),
            "train_acc": self._accuracy(train_x, labels),
            "fisher_trace": float(fisher),
        }

    # ------------------------------------------------------------------ filter and retrain
    def filter_and_restart(self, trained: dict[str, float]) -> dict[str, float]:
        """The filtering defence's turn, after the first training: score every training sample with
        ``defence_filter`` (which never sees the poison mask), remove them per ``filter_fraction`` and
        ``filter_scope``, score the removal against the mask, and restart from the initial weights and
        the seed's shuffling on the kept samples. Returns the ``pre_filter_*`` and ``filter_*`` metrics
        (also kept for the result); the time it took is part of this epoch's seconds."""
        cfg = self.cfg
        t0 = time.perf_counter()
        x, y, poison = self.trained_set()
        found = FILTERS[cfg.defence_filter].fn(self.filter_context(x, y))
        removed = select_removed(found.scores, y, found.suspect, cfg.filter_fraction, cfg.filter_scope)
        report = {
            "pre_filter_clean_acc": trained["clean_acc"],
            "pre_filter_asr": trained["asr"],
            "pre_filter_train_acc": trained["train_acc"],
            **removal_quality(removed, poison, found.scores),
            "filter_class": -1 if found.suspect is None else found.suspect,
        }
        self.artifacts["filter"] = {
            "removed": torch.nonzero(removed).flatten().tolist(),
            "suspect": found.suspect,
            "details": found.details,
        }
        self.keep = ~removed.to(self.device)
        torch.manual_seed(cfg.seed)
        self.model.load_state_dict(self.initial_model)
        self.optimizer = sgd(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        report["filter_seconds"] = time.perf_counter() - t0
        self.filter_report = report
        return report

    def filter_context(self, x: torch.Tensor, y: torch.Tensor) -> DetectionContext:
        """What a filter reads: the model and the training set as trained (raw images ``x`` and labels ``y``
        of :meth:`trained_set`), without its poison mask (a defender does not know it), and the detection
        settings; no held-out data, no spectrum."""
        from trainables.detection.context import DetectionContext, DetectionSettings, TrainingSet

        return DetectionContext(
            model=self.model,
            settings=DetectionSettings.from_config(self.cfg),
            mean=self.data.mean,
            std=self.data.std,
            device=self.device,
            training=TrainingSet(self.data.normalize(x), y, None),
        )

    # ------------------------------------------------------------------ input-space analysis
    def hessian_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized inputs and labels averaged into H, per the paper's threat models (Sec. 5).

        stochastic poisoning -> the clean training data (the defender holds only clean data);
        deterministic -> the poisoned training set as trained on; or ``hessian_split``'s choice.
        A seeded random subset of ``hessian_samples`` is taken when the split is larger.
        """
        cfg, data = self.cfg, self.data
        split = cfg.spectrum_split
        if split == "test":
            x, y = data.test_x, data.test_y
        elif split == "clean-train":
            x, y = data.train_x, data.train_y
        else:
            x, y, _ = self.trained_set()
        if len(y) > cfg.hessian_samples:
            g = torch.Generator().manual_seed(cfg.seed + 7)
            idx = torch.randperm(len(y), generator=g)[: cfg.hessian_samples].sort().values.to(y.device)
            x, y = x[idx], y[idx]
        return data.normalize(x), y

    def trained_set(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training set as (last) trained on: raw images with the trigger on the poisoned and cover
        samples, the labels trained on, and the poison mask (the relabelled samples; none before training).
        After a filtering defence, the kept samples only."""
        data, p = self.data, self.poisoner
        mask = p.fixed if p.fixed is not None else self.last_mask
        if mask is None:
            mask = torch.zeros_like(data.train_y, dtype=torch.bool)
        x, y = self.trigger.apply(data.train_x, p.carriers(mask)), p.poisoned_labels(mask)
        if self.keep is not None:  # after a filtering defence: what the retrain trained on
            return x[self.keep], y[self.keep], mask[self.keep]
        return x, y, mask

    def hessian_plan(self) -> tuple[str, str]:
        """(path, reason) the spectrum will use (:func:`trainables.spectrum.hessian.plan_spectrum`)."""
        cfg = self.cfg
        c, h, w = cfg.image_shape
        n = min(cfg.hessian_samples, len(self.data.train_y) if cfg.hessian_split != "test" else len(self.data.test_y))
        itemsize = 8 if cfg.hessian_dtype == "float64" else 4
        return plan_spectrum(
            cfg.hessian_method,
            bool(getattr(self.model, "piecewise_linear", False)),
            cfg.model,
            c * h * w,
            n,
            cfg.num_classes,
            cfg.hessian_dense_mb,
            itemsize,
        )

    def hessian_operator(self) -> InputHessian:
        """The input Hessian of the current model on :meth:`hessian_data`, as an HVP operator
        (``auto`` and the J^T S J paths: double-backward; gauss-newton as asked)."""
        cfg = self.cfg
        method = "gauss-newton" if cfg.hessian_method == "gauss-newton" else "double-backward"
        if method == "gauss-newton":
            self.hessian_plan()  # refuses smooth models
        dtype = torch.float64 if cfg.hessian_dtype == "float64" else torch.float32
        x, y = self.hessian_data()
        return InputHessian(self.model, x, y, cfg.eval_batch_size, method, dtype)

    def spectrum(
        self, on_iteration: Callable[[int], None] | None = None, classes: bool = False
    ) -> tuple[dict[str, float], torch.Tensor, list[float]]:
        """Top-k input-Hessian eigenpairs and trigger overlaps: (metrics, (k, C, H, W) vectors, overlaps).

        The path (exact, gram-lanczos, HVP Lanczos) and why it was picked are kept in
        ``self.hessian_info`` (the ``hessian`` entry of the trial's JSON). ``classes``: also the
        per-class spectra from the exact path's Jacobian pass, in ``self.class_spectra`` (None when
        they were not asked for or did not fit), for detection after training only.
        """
        cfg = self.cfg
        t0 = time.perf_counter()
        x, y = self.hessian_data()
        dtype = torch.float64 if cfg.hessian_dtype == "float64" else torch.float32
        spec = input_hessian_spectrum(
            self.model,
            x,
            y,
            method=cfg.hessian_method,
            k=cfg.hessian_top_k,
            iterations=cfg.hessian_iterations,
            max_iterations=cfg.hessian_max_iterations,
            tol=cfg.hessian_tol,
            dense_mb=cfg.hessian_dense_mb,
            chunk_size=cfg.eval_batch_size,
            dtype=dtype,
            seed=cfg.seed,
            model_name=cfg.model,
            on_iteration=on_iteration,
            groups=y if classes else None,
            n_groups=cfg.num_classes,
        )
        metrics, vecs, overlaps = spectrum_metrics(spec, self.direction)
        self.class_spectra = None if spec.groups is None else asdict(spec.groups)
        metrics["hessian_samples"] = len(y)
        metrics["hessian_seconds"] = time.perf_counter() - t0
        self.hessian_info = {
            "method_used": spec.method,
            "reason": spec.reason,
            "converged": bool(spec.converged),
            "lanczos_iterations": spec.iterations,
        }
        return metrics, vecs.T.reshape(-1, *cfg.image_shape).float().cpu(), overlaps

    def keep_spectrum(self, metrics: dict[str, float], vecs: torch.Tensor, overlaps: list[float]) -> None:
        """Keep a :meth:`spectrum`'s results in ``artifacts``, where detection and tracking read them."""
        self.artifacts["eigenvalues"] = [metrics[f"lambda_{j + 1}"] for j in range(self.cfg.hessian_top_k)]
        self.artifacts["overlaps"] = overlaps
        # the J^T S J paths know tr(H) exactly (||A||_F^2): detection uses it instead of an estimate
        self.artifacts["hessian"] = {**self.hessian_info, "trace": metrics.get("hessian_trace")}
        if self.class_spectra is not None:
            self.artifacts["class_spectra"] = self.class_spectra
        self.artifacts["eigenvectors"] = vecs
        self.artifacts["trigger_direction"] = self.direction.float().cpu()

    def analyze(self, on_iteration: Callable[[int], None] | None = None) -> dict[str, float]:
        """Final input-space analysis: spectrum + overlaps and feature geometry (once; kept in checkpoints)."""
        cfg, data = self.cfg, self.data
        if self.analysis or self.status != "completed":
            return self.analysis
        out: dict[str, float] = {}
        if cfg.hessian:
            metrics, vecs, overlaps = self.spectrum(on_iteration, classes=cfg.detect)
            out.update(metrics)
            self.keep_spectrum(metrics, vecs, overlaps)
        if cfg.geometry and cfg.target_mode == "all-to-one":  # its table is relative to one target class
            clean = features(self.model, self.test_x, cfg.eval_batch_size)
            trig = features(self.model, data.normalize(self.trigger.apply(data.test_x)), cfg.eval_batch_size)
            rows = feature_geometry(clean, trig, data.test_y, cfg.target, cfg.num_classes)
            self.artifacts["geometry"] = rows
            out.update(geometry_summary(rows, cfg.target))
        if cfg.detect or cfg.detect_baselines:  # after the spectrum: reads its eigenpairs from artifacts
            from trainables.detection.statistics import run_detection

            found, artifacts = run_detection(self.detection_context())
            out.update(found)
            self.artifacts.update(artifacts)
        self.analysis = out
        return out

    def detection_context(self, access: Iterable[str] | None = None) -> DetectionContext:
        """What detection reads of this trial, as typed values: the spectrum :meth:`keep_spectrum` kept
        and the data of each access level in ``access`` (default: what the entries to run declare).

        Clean held-out images are a seeded subset of the test split (never trained on); the training set
        as trained (triggers applied, poisoned labels) and its poison mask are those of the last epoch.
        With no spectrum kept the statistics are off: they have nothing to read.
        """
        from trainables.detection.context import (
            DetectionContext,
            DetectionSettings,
            DetectionSpectrum,
            TrainingSet,
            seeded,
        )
        from trainables.detection.statistics import needed_access
        from trainables.spectrum.spectra import GroupSpectra

        cfg, data = self.cfg, self.data
        settings = DetectionSettings.from_config(cfg)
        vecs = self.artifacts.get("eigenvectors")
        if vecs is None:
            settings = replace(settings, detect=False)
        levels = set(needed_access(settings) if access is None else access)
        spectrum = heldout = training = None
        if vecs is not None and "spectrum-samples" in levels:
            x, y = self.hessian_data()
            trace = (self.artifacts.get("hessian") or {}).get("trace")
            stored = self.artifacts.get("class_spectra")  # a dict: checkpoints hold plain tensors
            spectrum = DetectionSpectrum(
                eigenvalues=tuple(self.artifacts["eigenvalues"]),
                eigenvectors=vecs,
                x=x,
                y=y,
                trace=float(trace) if trace is not None and math.isfinite(trace) else None,
                classes=GroupSpectra(**stored) if stored is not None else None,
            )
        if "clean-data" in levels:
            idx = torch.randperm(len(data.test_y), generator=seeded(cfg.seed, 11))[: cfg.detect_samples]
            idx = idx.sort().values.to(data.test_y.device)
            heldout = (data.test_x[idx], data.test_y[idx])
        if "training-set" in levels:
            x, y, mask = self.trained_set()
            training = TrainingSet(data.normalize(x), y, mask)  # cover samples are not relabelled: not poison
        return DetectionContext(
            model=self.model,
            settings=settings,
            mean=data.mean,
            std=data.std,
            device=self.device,
            spectrum=spectrum,
            heldout=heldout,
            training=training,
            trigger_direction=self.direction,
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit: model, optimizer, epoch, history, RNGs."""
        np_state = np.random.get_state()
        state = {
            "version": CHECKPOINT_VERSION,
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "status": self.status,
            "diverged_epoch": self.diverged_epoch,
            "history": self.history,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "poisoner": self.poisoner.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python_rng": random.getstate(),
            "last_mask": self.last_mask,
            "keep": self.keep,
            "filter_report": self.filter_report,
            "analysis": self.analysis,
            "artifacts": self.artifacts,
        }
        if self.device.type == "cuda":  # untested here (no GPU on the CI machine)
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; refuses one written for another config."""
        if state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"checkpoint version {state.get('version')!r}, expected {CHECKPOINT_VERSION}")
        now = self.cfg.to_dict()
        # a checkpoint written before a field existed ran with that field's default: compare it as such
        defaults = {f.name: f.default for f in dataclasses.fields(TrialConfig) if f.default is not dataclasses.MISSING}
        defaults.update({name: e.default for name, e in EXTRA_FIELDS.items()})
        saved = {**{k: defaults[k] for k in now if k in defaults and k not in state["config"]}, **state["config"]}
        if saved != now:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise CheckpointError(f"checkpoint was written for another config (fields differ: {diff})")
        self.epoch = state["epoch"]
        self.status = state["status"]
        self.diverged_epoch = state["diverged_epoch"]
        self.history = list(state["history"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.poisoner.load_state_dict(state["poisoner"])
        torch.set_rng_state(state["torch_rng"])
        name, keys, *rest = state["numpy_rng"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        random.setstate(_as_tuple(state["python_rng"]))
        self.last_mask = state["last_mask"]
        # written before filtering defences existed: one training, all samples
        self.keep = state.get("keep")
        self.filter_report = dict(state.get("filter_report") or {})
        self.analysis = dict(state["analysis"])
        self.artifacts = dict(state["artifacts"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def save(self, path: str | os.PathLike) -> None:
        """Atomically write the checkpoint (a crash mid-write leaves the previous one intact)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)

    def load(self, path: str | os.PathLike) -> None:
        """Read a checkpoint with ``weights_only=True`` (no arbitrary code) and restore it."""
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"unreadable checkpoint {path}: {type(e).__name__}: {e}") from None
        self.load_state_dict(state)

    # ------------------------------------------------------------------ result
    def result(self) -> TrialResult:
        """Final metrics (the last epoch's) with history and status."""
        final = dict(self.history[-1]) if self.history else {}
        final.pop("epoch_seconds", None)
        final["train_seconds"] = sum(h.get("epoch_seconds", 0.0) for h in self.history)  # both stages, filter too
        final.update(self.filter_report)
        final.update(self.analysis)
        return TrialResult(
            config=self.cfg.to_dict(),
            status=self.status,
            metrics=final,
            history=list(self.history),
            diverged_epoch=self.diverged_epoch,
            artifacts=dict(self.artifacts),
        )


def _as_tuple(obj):
    return tuple(_as_tuple(o) for o in obj) if isinstance(obj, list | tuple) else obj


def run_trial(
    cfg: TrialConfig,
    checkpoint: str | os.PathLike | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    data: ImageData | None = None,
    max_epochs: int | None = None,
    on_lanczos: Callable[[int], None] | None = None,
) -> TrialResult:
    """Train a trial to the end (or for ``max_epochs`` more epochs), checkpointing each epoch,
    then run the input-space analysis.

    An existing ``checkpoint`` is resumed; ``on_epoch`` receives every epoch's metrics and
    ``on_lanczos`` every Hessian-vector product of the final spectrum. Torch runs with
    ``cfg.threads`` CPU threads (restored afterwards), the same as in a sweep.
    """
    with torch_threads(cfg.threads):
        return _run(cfg, checkpoint, on_epoch, data, max_epochs, on_lanczos)


def _run(cfg, checkpoint, on_epoch, data, max_epochs, on_lanczos) -> TrialResult:
    trial = Trial(cfg, data)
    if checkpoint is not None and Path(checkpoint).is_file():
        trial.load(checkpoint)
    ran = 0
    while not trial.done and (max_epochs is None or ran < max_epochs):
        metrics = trial.train_epoch()
        ran += 1
        if checkpoint is not None:
            trial.save(checkpoint)
        if on_epoch is not None:
            on_epoch(metrics)
    if (
        trial.status == "completed"
        and not trial.analysis
        and (cfg.hessian or cfg.geometry or cfg.detect or cfg.detect_baselines)
    ):
        trial.analyze(on_lanczos)
        if checkpoint is not None:
            trial.save(checkpoint)
    return trial.result()
