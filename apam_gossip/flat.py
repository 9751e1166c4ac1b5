"""A model's state and gradients as views into flat buffers.

After :func:`flatten`, a model is two 1-D tensors:

* ``state`` = ``[trainable parameters | floating-point buffers]``: everything a transport
  moves and an evaluator loads. Buffers are module state that is not trained by
  gradients but changes in training (BatchNorm running statistics); they travel with the
  parameters so every mode can keep them consistent (see :mod:`apam_gossip.algorithms`).
* ``grad_msg`` = ``[gradients | room for the buffers]``: what a worker sends after a
  mini-batch; :meth:`FlatModel.pack_grad_msg` copies the buffers (as the forward pass
  left them) into the second part.

Every trainable ``p.data`` is a view into ``state[:n_params]``, every ``p.grad`` a view
into ``grad_msg[:n_params]`` and every floating buffer a view into ``state[n_params:]``, so
a transport moves the model with one copy or one message and an optimizer steps it with a
few vectorised ops. Autograd accumulates into an existing ``.grad`` in place, so the views
survive ``backward()``; zero the gradients with :meth:`FlatModel.zero_grad` (never set
``p.grad = None``, which would detach them from the buffer).

Parameters with ``requires_grad=False`` are neither updated nor counted: they stay as the
seeded model factory built them, identically in every process. Integer buffers (BatchNorm's
``num_batches_tracked``) stay local: they do not change the model's function unless the
BatchNorm momentum is None. Complex parameters are refused. A sparse gradient
(``nn.Embedding(sparse=True)``) is added into the dense flat gradient in place by autograd:
correct, without the memory saving; were a gradient ever to replace its view, the first
backward pass says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import UserError


@dataclass
class FlatModel:
    """Flat state and gradient buffers that back a model."""

    model: nn.Module
    state: Tensor  # [params | float buffers]
    grad_msg: Tensor  # [grads | buffers as of the last forward pass]
    n_params: int

    @property
    def params(self) -> Tensor:
        return self.state[: self.n_params]

    @property
    def buffers(self) -> Tensor:
        return self.state[self.n_params:]

    @property
    def grads(self) -> Tensor:
        return self.grad_msg[: self.n_params]

    @property
    def numel(self) -> int:
        """Length of the state vector (what transports move)."""
        return self.state.numel()

    @property
    def n_buffers(self) -> int:
        return self.state.numel() - self.n_params

    def zero_grad(self) -> None:
        self.grads.zero_()

    def pack_grad_msg(self) -> Tensor:
        """``[grads | current buffers]``: a gradient message (no copy without buffers)."""
        if self.n_buffers:
            self.grad_msg[self.n_params:].copy_(self.buffers)
        return self.grad_msg

    def check_views(self) -> bool:
        """True while every parameter and gradient still lives in the flat buffers."""
        lo_p, lo_g = self.state.data_ptr(), self.grad_msg.data_ptr()
        size = self.state.element_size() * self.numel
        for p in trainable(self.model):
            if p.grad is None or p.grad.is_sparse:
                return False
            if not (lo_p <= p.data_ptr() < lo_p + size and lo_g <= p.grad.data_ptr() < lo_g + size):
                return False
        return True

    def check_gradients(self, who: str) -> None:
        """After a backward pass: a sparse gradient (an ``nn.Embedding(sparse=True)``,
        say) replaced a view; say so once, clearly."""
        for name, p in self.model.named_parameters():
            if p.requires_grad and p.grad is not None and p.grad.is_sparse:
                raise UserError(f"{who}: parameter {name!r} got a sparse gradient; sparse "
                                "gradients are not supported (use dense layers, e.g. "
                                "nn.Embedding(sparse=False))")


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def float_buffers(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(n, b) for n, b in model.named_buffers() if b is not None and b.is_floating_point()]


def flatten(model: nn.Module, device: torch.device | str | None = None,
            who: str = "model") -> FlatModel:
    """Move ``model``'s trainable parameters and floating buffers into one flat state
    vector (and fresh zero gradients into another); ``who`` names the model in errors."""
    params = trainable(model)
    if not params:
        raise UserError(f"{who} has no trainable parameters (every parameter has "
                        "requires_grad=False)")
    for name, p in model.named_parameters():
        if p.is_complex():
            raise UserError(f"{who}: parameter {name!r} is complex ({p.dtype}); complex "
                            "parameters are not supported (split them into real and "
                            "imaginary parts)")
    dtype = params[0].dtype
    buffers = float_buffers(model)
    if any(p.dtype != dtype for p in params) or any(b.dtype != dtype for _, b in buffers):
        kinds = sorted({str(p.dtype) for p in params} | {str(b.dtype) for _, b in buffers})
        raise UserError(f"{who} mixes floating dtypes ({', '.join(kinds)}); give every "
                        "parameter and buffer one dtype (model.to(torch.float32))")
    device = torch.device(device) if device is not None else params[0].device
    n_params = sum(p.numel() for p in params)
    n_state = n_params + sum(b.numel() for _, b in buffers)
    state = torch.empty(n_state, dtype=dtype, device=device)
    grad_msg = torch.zeros(n_state, dtype=dtype, device=device)
    offset = 0
    for p in params:
        n = p.numel()
        state[offset: offset + n].copy_(p.data.reshape(-1))
        p.data = state[offset: offset + n].view_as(p)
        p.grad = grad_msg[offset: offset + n].view_as(p)
        offset += n
    for name, b in buffers:
        n = b.numel()
        state[offset: offset + n].copy_(b.reshape(-1))
        _set_buffer(model, name, state[offset: offset + n].view_as(b))
        offset += n
    # frozen parameters and integer buffers are not in the state: move them along
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(device)
    for name, b in model.named_buffers():
        if b is not None and not b.is_floating_point():
            _set_buffer(model, name, b.to(device))
    return FlatModel(model=model, state=state, grad_msg=grad_msg, n_params=n_params)


def _set_buffer(model: nn.Module, name: str, value: Tensor) -> None:
    *path, leaf = name.split(".")
    owner = model
    for part in path:
        owner = getattr(owner, part)
    owner._buffers[leaf] = value


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable(model))
