"""The trial's optimizer: SGD with momentum and weight decay, written out.

``torch.optim.SGD`` computes the same update, but constructing any ``torch.optim`` optimizer imports
``torch._dynamo`` (its ``_patch_step_function`` is wrapped in ``torch._disable_dynamo``): 0.85 s of one
core on an idle machine here, 1.3 s inside a busy Ray worker, in every process that trains, paid by each
Ray worker process of a sweep before its first epoch. This update is the one of
``torch.optim.sgd._single_tensor_sgd`` (torch's path on CPU), operation for operation, so the numbers
are bit-identical to ``torch.optim.SGD`` there (``tests/test_optimizer.py``), and the state dict has
torch's layout: a checkpoint written with ``torch.optim.SGD`` resumes with this one and vice versa.

On a GPU, :func:`sgd` returns ``torch.optim.SGD`` itself: there torch batches the update over all
parameters (``_multi_tensor_sgd``), a per-parameter loop would cost hundreds of kernel launches a step,
and a second of import does not matter beside the CUDA context's start.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def sgd(params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    """The trial's optimizer: :class:`SGD` for parameters on the CPU, ``torch.optim.SGD`` elsewhere (the same
    update and state-dict layout)."""
    params = list(params)
    if params and params[0].device.type != "cpu":  # untested here (no GPU on the CI machine)
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class SGD:
    """SGD with heavy-ball momentum (PyTorch's convention: ``buf = m·buf + g``, ``p -= lr·buf``) and L2 weight
    decay added to the gradient; one parameter group, whose ``lr`` the training loop sets each epoch."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        # torch.optim.SGD's keys, so state dicts are interchangeable; dampening 0, no Nesterov, no maximise
        self.param_groups = [
            {
                "lr": lr,
                "momentum": momentum,
                "dampening": 0.0,
                "weight_decay": weight_decay,
                "nesterov": False,
                "maximize": False,
                "foreach": None,
                "differentiable": False,
                "fused": None,
                "params": list(range(len(self.params))),
            }
        ]
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) every parameter's gradient."""
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:  # as torch's Optimizer.zero_grad
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        group = self.param_groups[0]
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = p.grad
            if weight_decay != 0:
                grad = grad.add(p, alpha=weight_decay)
            if momentum != 0:
                buf = self.momentum_buffers[i]
                if buf is None:  # the first step: the buffer is the gradient itself
                    buf = grad.detach().clone()
                    self.momentum_buffers[i] = buf
                else:
                    buf.mul_(momentum).add_(grad)
                grad = buf
            p.add_(grad, alpha=-lr)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.SGD``'s layout: per-parameter ``momentum_buffer`` under its index, and the group."""
        return {
            "state": {i: {"momentum_buffer": b} for i, b in enumerate(self.momentum_buffers) if b is not None},
            "param_groups": [dict(g) for g in self.param_groups],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (or a ``torch.optim.SGD`` one); buffers move to each parameter's
        device and dtype, as torch's optimizers do."""
        groups = state["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(
                f"optimizer state has {len(groups)} group(s) of {[len(g['params']) for g in groups]} parameters;"
                f" this optimizer has 1 group of {len(self.params)}"
            )
        unsupported = {
            k: groups[0][k]
            for k in ("dampening", "nesterov", "maximize")
            if groups[0].get(k, 0) not in (0, 0.0, False)  # a key torch added later is absent: its default
        }
        if unsupported:
            raise ValueError(f"optimizer state uses {unsupported}, which this SGD does not implement")
        order = groups[0]["params"]  # the saved ids of the parameters, in their group's order
        self.param_groups[0].update({k: v for k, v in groups[0].items() if k != "params"})
        self.momentum_buffers = [None] * len(self.params)
        for i, saved_id in enumerate(order):
            buf = state["state"].get(saved_id, {}).get("momentum_buffer")
            if buf is not None:
                self.momentum_buffers[i] = buf.to(device=self.params[i].device, dtype=self.params[i].dtype)
