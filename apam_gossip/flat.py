"""A model's parameters and gradients as views into one contiguous buffer each.

After :func:`flatten`, every ``p.data`` is a view into ``FlatParams.params`` and every
``p.grad`` a view into ``FlatParams.grads``, so the whole model is one 1-D tensor: a
transport moves it with one copy or one message, and an optimizer steps it with a few
vectorised ops. Autograd accumulates into an existing ``.grad`` in place, so the views
survive ``backward()``; zero the gradients with :meth:`FlatParams.zero_grad` (never set
``p.grad = None``, which would detach them from the buffer).

Models must not have buffers that change in training (BatchNorm running stats): only
parameters are communicated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class FlatParams:
    """Flat parameter and gradient buffers that back a model's parameters."""

    model: nn.Module
    params: Tensor
    grads: Tensor

    @property
    def numel(self) -> int:
        return self.params.numel()

    def zero_grad(self) -> None:
        self.grads.zero_()

    def check_views(self) -> bool:
        """True while every parameter and gradient still lives in the flat buffers."""
        lo_p, lo_g = self.params.data_ptr(), self.grads.data_ptr()
        size = self.params.element_size() * self.numel
        for p in self.model.parameters():
            if p.grad is None:
                return False
            if not (lo_p <= p.data_ptr() < lo_p + size and lo_g <= p.grad.data_ptr() < lo_g + size):
                return False
        return True


def flatten(model: nn.Module, device: torch.device | str | None = None) -> FlatParams:
    """Move ``model``'s parameters (and fresh zero gradients) into flat buffers."""
    params = [p for p in model.parameters()]
    if not params:
        raise ValueError("model has no parameters to flatten")
    dtype = params[0].dtype
    if any(p.dtype != dtype for p in params):
        raise TypeError("all parameters must share one dtype to be flattened")
    device = torch.device(device) if device is not None else params[0].device
    total = sum(p.numel() for p in params)
    flat_p = torch.empty(total, dtype=dtype, device=device)
    flat_g = torch.zeros(total, dtype=dtype, device=device)
    offset = 0
    for p in params:
        n = p.numel()
        flat_p[offset : offset + n].copy_(p.data.reshape(-1))
        p.data = flat_p[offset : offset + n].view_as(p)
        p.grad = flat_g[offset : offset + n].view_as(p)
        offset += n
    return FlatParams(model=model, params=flat_p, grads=flat_g)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
