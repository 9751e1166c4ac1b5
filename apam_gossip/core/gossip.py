"""One gossip worker's local rule (AD-PSGD with a local adaptive step), with no processes.

A worker takes a snapshot of its model ``x_i = [params | buffers]`` at version ``v0``,
computes a gradient there (its forward pass moves the buffers: BatchNorm statistics),
averages with a neighbor (the transport's atomic pairwise average) and then applies
:meth:`GossipRule.step` to its *current* ``x_i``: the optimizer step on the parameters
with the learning rate ``lr x factor`` (``optim.gossip_lr``, see
:func:`~apam_gossip.optim.gossip_lr_factor`) and the buffers' change made by the forward
pass added as a delta, so averages that reached ``x_i`` meanwhile are kept. With a tracked
second moment ``u_i`` (``adaptive_state = "tracked"``) the step is DAMSGrad's
(:func:`~apam_gossip.optim.damsgrad_step`). The step's staleness is the number of writes to
``x_i`` by others between the snapshot and the step: ``v1 - v0 - 1 - averaged``, where
``v1`` is the version after the step and ``averaged`` says whether this worker's own
average landed in between.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from ..config import OptimConfig
from ..optim import Optimizer, OptState, gossip_lr_factor


def local_step(opt: Optimizer, g: Tensor, state: OptState, tracked: bool,
               audit: Tensor | None, lr: float, n_params: int, buffer_delta: Tensor | None,
               x: Tensor, u: Tensor | None) -> None:
    """The local step on a worker's current state ``x = [params | buffers]`` (see the
    module docstring); ``audit`` (float64), if given, accumulates exactly the change
    this step made to ``x``."""
    if audit is not None:
        audit.sub_(x)
    opt.update(x[:n_params], g, state, lr=lr, tracked=u if tracked else None)
    if buffer_delta is not None:
        x[n_params:].add_(buffer_delta)
    if audit is not None:
        audit.add_(x)  # audit accumulates x_after - x_before: exactly this step


class GossipRule:
    """The rule every gossip driver applies (shared-memory and MPI workers, the loop
    API, the simulator): ``n_workers`` fixes the lr factor."""

    def __init__(self, optim: OptimConfig, n_workers: int, n_params: int,
                 tracked: bool) -> None:
        self.opt = Optimizer(optim)
        self.n_params, self.tracked = n_params, tracked
        self.lr_factor = gossip_lr_factor(optim.gossip_lr, n_workers)

    def init_state(self, device: torch.device | str = "cpu") -> OptState:
        """A fresh local optimizer state on ``device`` (where the worker's model is)."""
        return self.opt.init(torch.zeros(self.n_params, device=device))

    def lr(self, base: float) -> float:
        """The local step's lr for the schedule's (or the user's) ``base`` lr."""
        return base * self.lr_factor

    def lr_at(self, update: int, total: int) -> float:
        """The lr of the ``update``-th of ``total`` updates of the run's budget."""
        return self.lr(self.opt.lr_at(update, total))

    @staticmethod
    def buffer_delta(after: Tensor, before: Tensor | None,
                     device: torch.device | str = "cpu") -> Tensor | None:
        """What a forward pass did to the buffers (None for a model without any), on
        ``device`` (where the local step runs)."""
        return None if before is None or before.numel() == 0 \
            else (after - before).to(device)

    def step(self, g: Tensor, state: OptState, lr: float, delta: Tensor | None,
             audit: Tensor | None = None) -> Callable[[Tensor, Tensor | None], None]:
        """The local step as a function of ``(x, u)``, for the transport to run on the
        worker's current model under its lock."""
        return partial(local_step, self.opt, g, state, self.tracked, audit, lr,
                       self.n_params, delta)

    @staticmethod
    def staleness(v0: int, v1: int, averaged: bool) -> int:
        """The step's staleness: writes to x_i by others between the snapshot (``v0``)
        and the step (after which x_i is at version ``v1``)."""
        return v1 - v0 - 1 - int(averaged)


__all__ = ["GossipRule", "local_step"]
