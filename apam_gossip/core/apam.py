"""The APAM master's rule, with no processes: a model, its optimizer state and progress.

The model state ``x`` is ``[params | buffers]`` with ``n_params`` trained entries. A
gradient message is ``[grads | buffers]``: the gradient at the model of version ``v``, and
the buffers (BatchNorm statistics) as the worker's forward pass left them. Applied when
the master is at version ``k``, the gradient has staleness ``k - v``; its learning rate is
the master's schedule at update ``k + 1`` (or the worker's own lr, the loop API), scaled
by the staleness rule (``optim.staleness_lr``); the master adopts the buffers with it.
The optimizer is ``optim`` as an asynchronous master of ``n_workers`` applies it
(:func:`~apam_gossip.optim.for_async_master`: the momentum rule).

A worker computes its next gradient at :meth:`ApamCore.model_for_workers`: ``x``, or with
``optim.lookahead`` the parameters moved ahead along the current step by about the
number of updates its gradient will be late.

Timing-only simulations pass ``x0=None``: then only the progress is kept.

**A sharded master** (``master_shards = K``): K cores, shard ``k`` owning the contiguous
slice ``[start_k, stop_k)`` of ``x`` (:func:`shards_of`; its first ``n_params`` entries
are trained, the rest are buffers) and that slice's optimizer state. Every optimizer here
is elementwise, so K shards that apply the same gradients in the same order compute the
same bits as one master. Each shard applies gradients in the order they reach *it* and
counts its own versions and staleness, so two shards may apply two workers' gradients in
opposite orders: a worker's model is assembled from the shards' replies, slice ``k`` at
shard ``k``'s version ``v_k``, and its gradient's staleness at shard ``k`` is that shard's
version when it applies it minus ``v_k``. The lr schedule and the staleness rule run per
shard on those counts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import OptimConfig
from ..optim import Optimizer, OptState, for_async_master, lookahead_point, staleness_scale


@dataclass
class MasterProgress:
    """What the master has done so far: everything a checkpoint carries besides x and the
    optimizer state (``wall_before``: training seconds of the runs this one resumes)."""

    version: int
    samples: int
    staleness: Counter[int]
    updates_of: list[int]
    samples_of: list[int]
    wall_before: float = 0.0

    @classmethod
    def fresh(cls, n_workers: int) -> MasterProgress:
        return cls(0, 0, Counter(), [0] * n_workers, [0] * n_workers)

    @classmethod
    def from_checkpoint(cls, ck: dict[str, Any], n_workers: int) -> MasterProgress:
        """The progress a checkpoint saved, continued by ``n_workers`` workers: the
        master's state does not depend on how many there are, so a run may resume with
        more (under mpirun, ``-n`` decides); the per-worker counts of workers that are no
        longer there stay in the totals."""
        pad = [0] * max(0, n_workers - len(ck["updates_of"]))
        return cls(int(ck["version"]), int(ck["samples"]),
                   Counter({int(k): int(v) for k, v in ck["staleness"].items()}),
                   [int(v) for v in ck["updates_of"]] + pad,
                   [int(v) for v in ck["samples_of"]] + pad, float(ck["wall_time"]))

    def record(self, worker: int, v_from: int, n_samples: int) -> None:
        """Count one applied gradient of ``worker`` computed at version ``v_from``."""
        self.staleness[self.version - v_from] += 1
        self.version += 1
        self.samples += n_samples
        self.updates_of[worker] += 1
        self.samples_of[worker] += n_samples


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` of a sharded master: the slice ``[start, stop)`` of the
    model state ``[params | buffers]``, whose first ``n_params`` entries are trained
    parameters. Its optimizer state is the slice ``[start, start + n_params)`` of the
    whole model's (which covers the parameters only)."""

    index: int
    count: int
    start: int
    stop: int
    n_params: int

    @property
    def leader(self) -> bool:
        """Shard 0 keeps the budget: it alone decides which gradients are computed."""
        return self.index == 0

    @property
    def numel(self) -> int:
        return self.stop - self.start

    def of(self, x: Tensor) -> Tensor:
        """This shard's slice of a whole-model tensor ``[params | buffers]`` (a view)."""
        return x[self.start:self.stop]

    def state_of(self, state: OptState) -> OptState:
        """This shard's slice of a whole-model optimizer state (copies; scalars as they
        are)."""
        a, b = self.start, self.start + self.n_params
        return {k: v[a:b].clone() if v.dim() else v.clone() for k, v in state.items()}


def shards_of(numel: int, n_params: int, count: int) -> list[Shard]:
    """``count`` contiguous slices of a model state of ``numel`` entries (``n_params`` of
    them trained), as even as whole entries allow: slice ``k`` is
    ``[k * numel // count, (k + 1) * numel // count)``."""
    if not 1 <= count <= numel:
        raise ValueError(f"master_shards must be between 1 and the model's {numel} entries, "
                         f"got {count}")
    out = []
    for k in range(count):
        a, b = k * numel // count, (k + 1) * numel // count
        out.append(Shard(k, count, a, b, max(0, min(b, n_params) - a)))
    return out


def join_states(parts: list[OptState]) -> OptState:
    """The whole model's optimizer state from its shards' (in shard order): tensors
    concatenated; scalars (the step count, equal on every shard at a consistent cut)
    the leader's."""
    return {k: torch.cat([p[k] for p in parts]) if v.dim() else v.clone()
            for k, v in parts[0].items()}


class ApamCore:
    """The master's model, optimizer state and progress, and its rule (see the module
    docstring). ``total``: the update budget the master's lr schedule runs over (None when
    every gradient brings its own lr)."""

    def __init__(self, x0: Tensor | None, optim: OptimConfig, n_workers: int, *,
                 n_params: int, total: int | None = None) -> None:
        self.opt = Optimizer(for_async_master(optim, n_workers))
        self.n_params, self.total = n_params, total
        self.x = x0.clone() if x0 is not None else None
        self.state: OptState | None = self.opt.init(self.x[:n_params]) \
            if self.x is not None else None
        self.progress = MasterProgress.fresh(n_workers)
        # --lookahead: each worker gets the model where it will be when its gradient
        # lands, about n - 1 updates from now (its own buffer: x keeps being updated)
        self.ahead = self.opt.hp.lookahead * (n_workers - 1)
        self._ahead_buf = self.x.clone() if self.ahead > 0 and self.x is not None else None
        self.step_lr = self.opt.hp.lr  # the lr of the last update (lookahead's step size)

    @property
    def version(self) -> int:
        return self.progress.version

    def restore(self, x: Tensor, state: OptState, version: int | None = None,
                progress: MasterProgress | None = None) -> None:
        """Continue from a saved model and optimizer state (and progress, or only its
        version: the loop API's workers bring it)."""
        assert self.x is not None
        self.x.copy_(x)
        # the state beside x (a checkpoint holds host tensors); the step count, a
        # scalar, stays on the host like Optimizer.init's
        self.state = {k: v.to(self.x.device, copy=True) if v.dim() else v.clone()
                      for k, v in state.items()}
        if progress is not None:
            self.progress = progress
        if version is not None:
            self.progress.version = int(version)

    def lr_for(self, staleness: int, lr: float | None = None) -> float:
        """The learning rate of the next update, of a gradient ``staleness`` updates old:
        the worker's ``lr`` or the master's schedule, times the staleness rule."""
        if lr is not None:  # the user's schedule; the staleness rule still applies
            return lr * staleness_scale(self.opt.hp.staleness_lr, staleness)
        assert self.total is not None, "no budget to schedule over: give the lr"
        return self.opt.lr_at(self.progress.version + 1, self.total, staleness)

    def apply(self, worker: int, msg: Tensor | None, version: int, samples: int,
              lr: float | None = None) -> int:
        """One update with worker ``worker``'s gradient message ``[grads | buffers]``
        computed at ``version`` (``msg`` None: timing only); returns its staleness."""
        p, n = self.progress, self.n_params
        stale = p.version - version
        lr = self.lr_for(stale, lr)
        self.step_lr = lr  # --lookahead: the steps ahead are taken of this size
        if msg is not None and self.x is not None:
            assert self.state is not None
            self.opt.update(self.x[:n], msg[:n], self.state, lr=lr)
            if self.x.numel() > n:
                self.x[n:].copy_(msg[n:])
        p.record(worker, version, samples)
        return stale

    def model_for_workers(self) -> Tensor:
        """The model a worker computes its next gradient at: ``x``, or with
        ``lookahead`` the parameters moved ahead along the current step
        (:func:`~apam_gossip.optim.lookahead_point`), the buffers as they are. The
        returned tensor is the core's own: copy it before the next :meth:`apply`."""
        assert self.x is not None and self.state is not None
        if self._ahead_buf is None:
            return self.x
        n, buf = self.n_params, self._ahead_buf
        # steps of the size of the last one (the lr it was applied with)
        lookahead_point(buf[:n], self.x[:n], self.state, self.opt.hp, self.step_lr,
                        self.ahead)
        if self.x.numel() > n:
            buf[n:].copy_(self.x[n:])
        return buf

    def finite(self) -> bool:
        return self.x is None or bool(torch.isfinite(self.x).all())


__all__ = ["ApamCore", "MasterProgress", "Shard", "shards_of", "join_states"]
