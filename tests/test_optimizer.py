"""The written-out SGD (trainables/training/optimizer.py) against torch.optim.SGD, its reference: the same
parameters bit for bit on CPU, interchangeable state dicts, and no torch._dynamo import in a trial."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from trainables.networks.nets import SmallCNN
from trainables.training.optimizer import SGD, sgd


def _steps(opt_factory, n: int = 12, seed: int = 0, lrs=(0.05, 0.01)):
    """``n`` steps of a small CNN on fixed random data under the optimizer ``opt_factory(params)``, with the
    learning rate changed halfway (as the schedule does); returns the net and the optimizer."""
    torch.manual_seed(seed)
    net = SmallCNN((1, 8, 8), 10)
    opt = opt_factory(net.parameters())
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    for i in range(n):
        opt.param_groups[0]["lr"] = lrs[i >= n // 2]
        loss = torch.nn.functional.cross_entropy(
            net(x[i % 4 * 16 : (i % 4 + 1) * 16]), y[i % 4 * 16 : (i % 4 + 1) * 16]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net, opt


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 5e-4), (0.9, 0.0), (0.0, 5e-4), (0.0, 0.0)])
def test_the_same_parameters_as_torch_sgd_bit_for_bit(momentum, weight_decay):
    ours, _ = _steps(lambda p: SGD(p, lr=0.05, momentum=momentum, weight_decay=weight_decay))
    ref, _ = _steps(lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum, weight_decay=weight_decay))
    assert _max_diff(ours, ref) == 0.0  # torch's CPU update, operation for operation: tolerance 0


def test_the_comparison_fails_for_another_update_rule():
    """The reference comparison can fail: Nesterov momentum (a different rule) is told apart at once."""
    ours, _ = _steps(lambda p: SGD(p, lr=0.05, momentum=0.9))
    other, _ = _steps(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True))
    assert _max_diff(ours, other) > 1e-4


@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("first,second", [("torch", "ours"), ("ours", "torch")])
def test_state_dicts_interchange_with_torch_sgd(first, second, momentum):
    """A checkpoint written by one continues in the other exactly as uninterrupted (old checkpoints hold
    torch.optim.SGD's state)."""
    make = {
        "torch": lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum, weight_decay=5e-4),
        "ours": lambda p: SGD(p, lr=0.05, momentum=momentum, weight_decay=5e-4),
    }
    straight, _ = _steps(make["torch"], n=12)
    net, opt = _steps(make[first], n=6, lrs=(0.05, 0.05))  # the first half, at the first half's rate
    state = {"model": net.state_dict(), "opt": opt.state_dict()}
    resumed = SmallCNN((1, 8, 8), 10)
    resumed.load_state_dict(state["model"])
    opt2 = make[second](resumed.parameters())
    opt2.load_state_dict(state["opt"])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    for i in range(6, 12):
        opt2.param_groups[0]["lr"] = 0.01
        loss = torch.nn.functional.cross_entropy(
            resumed(x[i % 4 * 16 : (i % 4 + 1) * 16]), y[i % 4 * 16 : (i % 4 + 1) * 16]
        )
        opt2.zero_grad(set_to_none=True)
        loss.backward()
        opt2.step()
    assert _max_diff(resumed, straight) == 0.0


def test_an_older_torchs_state_loads():
    """Older torch wrote ``momentum_buffer: None`` for parameters without a buffer and no ``maximize`` key."""
    net = SmallCNN((1, 8, 8), 10)
    ref = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    state = ref.state_dict()
    state["state"] = {i: {"momentum_buffer": None} for i in range(len(list(net.parameters())))}
    for key in ("maximize", "foreach", "differentiable", "fused"):
        del state["param_groups"][0][key]
    ours = SGD(net.parameters(), lr=0.1, momentum=0.9)
    ours.load_state_dict(state)
    assert ours.momentum_buffers == [None] * len(ours.params) and ours.param_groups[0]["lr"] == 0.1


def test_the_trial_takes_this_sgd_on_the_cpu():
    assert type(sgd(SmallCNN((1, 8, 8), 10).parameters(), lr=0.1, momentum=0.9)) is SGD


def test_a_state_it_cannot_continue_is_refused():
    net = SmallCNN((1, 8, 8), 10)
    nesterov = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True).state_dict()
    with pytest.raises(ValueError, match="nesterov"):
        SGD(net.parameters(), lr=0.1, momentum=0.9).load_state_dict(nesterov)
    other = torch.optim.SGD(list(net.parameters())[:2], lr=0.1).state_dict()
    with pytest.raises(ValueError, match="this optimizer has 1 group of"):
        SGD(net.parameters(), lr=0.1).load_state_dict(other)


def test_a_trial_does_not_import_torch_dynamo():
    """The reason for this module: a whole digits trial (training, spectrum, detection) leaves torch._dynamo
    unimported (any torch.optim optimizer imports it: about a second of every Ray worker's start)."""
    code = (
        "import sys\n"
        "from trainables.config import TrialConfig\n"
        "from trainables.training.train import Trial\n"
        "t = Trial(TrialConfig(epochs=1))\n"
        "t.train_epoch()\n"
        "t.analyze()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
