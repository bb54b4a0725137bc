"""Forward passes in CPU-sized chunks (trainables/networks/batching.py): a trial's evaluation in chunks
equals one float64 pass over the whole set."""

from __future__ import annotations

import copy

import torch

from trainables.config import TrialConfig
from trainables.defence.penalty import per_sample_input_grad_sq
from trainables.networks.batching import CPU_FORWARD_CHUNK, forward_chunk
from trainables.training.train import Trial


def test_the_chunk_is_capped_on_the_cpu_only():
    assert forward_chunk(1000, torch.device("cpu")) == CPU_FORWARD_CHUNK
    assert forward_chunk(50, torch.device("cpu")) == 50
    assert forward_chunk(1000, torch.device("cuda")) == 1000  # a device object: no GPU needed to ask


def _trained_trial() -> Trial:
    trial = Trial(TrialConfig(epochs=1, hessian=False, geometry=False, detect=False))
    trial.train_epoch()
    assert len(trial.data.test_y) > 2 * CPU_FORWARD_CHUNK  # several chunks, the last one partial
    return trial


def test_chunked_evaluation_equals_one_float64_pass():
    """clean_acc, asr and the input-Fisher trace of :meth:`Trial.evaluate` (chunks of 128) against the
    model in float64 over each whole set at once: accuracies equal, Fisher to 1e-4 relative (float32)."""
    trial = _trained_trial()
    got = trial.evaluate()
    ref = copy.deepcopy(trial.model).double().eval()
    x, y = trial.test_x.double(), trial.data.test_y
    with torch.no_grad():
        assert got["clean_acc"] == float((ref(x).argmax(1) == y).double().mean())
        assert got["asr"] == float((ref(trial.asr_x.double()).argmax(1) == trial.asr_y).double().mean())
    fisher = float(per_sample_input_grad_sq(ref, x[:1000], y[:1000]).mean())
    assert abs(got["fisher_trace"] - fisher) <= 1e-4 * abs(fisher)


def test_the_fisher_reads_exactly_its_first_1000_test_images_in_chunks():
    """A test set of 1100 images (1000 is no multiple of the chunk): the trace is the mean over the first
    1000 exactly, against float64 in one pass, neither a chunk short nor running past the 1000th."""
    trial = _trained_trial()
    g = torch.Generator().manual_seed(5)
    raw = torch.rand(1100, *trial.data.test_x.shape[1:], generator=g)
    labels = torch.randint(0, trial.data.num_classes, (1100,), generator=g)
    trial.data.test_x, trial.data.test_y = raw, labels
    trial.test_x = trial.data.normalize(raw)
    got = trial.evaluate()["fisher_trace"]
    ref = copy.deepcopy(trial.model).double().eval()
    x = trial.test_x.double()
    want = float(per_sample_input_grad_sq(ref, x[:1000], labels[:1000]).mean())
    past = float(per_sample_input_grad_sq(ref, x[:1024], labels[:1024]).mean())  # chunks of 128 running over
    assert abs(got - want) <= 1e-4 * abs(want) and abs(past - want) > 1e-4 * abs(want)


def test_the_comparison_fails_on_a_chunk_left_out():
    """The Fisher comparison above can fail: the trace over the first chunk only (a loop that stops one
    chunk early would give this) misses the tolerance."""
    trial = _trained_trial()
    ref = copy.deepcopy(trial.model).double().eval()
    x, y = trial.test_x.double(), trial.data.test_y
    whole = float(per_sample_input_grad_sq(ref, x, y).mean())
    first = float(per_sample_input_grad_sq(ref, x[:CPU_FORWARD_CHUNK], y[:CPU_FORWARD_CHUNK]).mean())
    assert abs(first - whole) > 1e-4 * abs(whole)
