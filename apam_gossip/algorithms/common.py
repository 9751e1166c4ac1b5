"""What every worker of every mode does: build its model, draw batches, compute gradients.

Seeds: every process builds the model from ``torch.manual_seed(seed)`` (see
:class:`~apam_gossip.task.Task`); worker ``i`` draws its batches from a stream seeded with
``worker_seed(seed, i)``. A 1-worker asynchronous run therefore sees exactly the batches of
the sequential run, for the built-in data and a user's datasets alike.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..flat import FlatModel, flatten
from ..messages import WorkerReport
from ..task import Task, compute_loss


def worker_seed(seed: int, worker: int) -> int:
    return seed * 1_000_003 + 7919 * (worker + 1)


def eval_points(total: int, evals: int) -> list[int]:
    """Update counts at which to evaluate: 0, then ``evals`` evenly spaced up to ``total``."""
    evals = min(evals, total)  # no more evaluation points than updates
    pts = sorted({round(total * j / evals) for j in range(1, evals + 1)} | {0})
    return pts


class Diverged(RuntimeError):
    """The loss or the gradient stopped being finite: the run stops (never a silent
    divergence); the last checkpoint, written while the model was finite, is kept."""


def batch_size_of(y: Any) -> int:
    """How many samples a batch's targets hold."""
    if isinstance(y, Tensor):
        return int(y.shape[0]) if y.dim() else 1
    return len(y)


@dataclass
class LocalWorker:
    """A worker's model, flat state and batch stream on its device."""

    index: int
    device: torch.device
    model: nn.Module
    flat: FlatModel
    stream: Any  # an endless mini-batch stream with .next() -> (x, y)
    task: Task
    slowdown: float = 1.0
    straggler_prob: float = 0.0
    straggler_factor: float = 1.0
    rng: random.Random | None = None
    compute_s: float = 0.0
    sleep_s: float = 0.0
    batches: int = 0

    @classmethod
    def build(cls, cfg: RunConfig, task: Task, data: Any, shard: Tensor, index: int,
              device: torch.device) -> LocalWorker:
        """Worker ``index``'s model (seeded: the same as every other process's) and its
        seeded stream over ``shard`` of the training data."""
        model = task.build_model().to(device)
        model.train()  # once: this model only ever computes gradients (0.2 ms a call)
        # the model was built from the run's seed (the same everywhere); from here on each
        # worker's randomness (dropout, a user's augmentation) is its own, still seeded
        torch.manual_seed(worker_seed(cfg.seed, index))
        flat = flatten(model, device, who=f"model {task.model_name}")
        stream = data.stream(shard, cfg.data.batch_size, worker_seed(cfg.seed, index), device,
                             cfg.data.augment)
        return cls(index, device, model, flat, stream, task, cfg.slowdown_of(index),
                   cfg.straggler_prob, cfg.straggler_factor,
                   random.Random(worker_seed(cfg.seed, index) + 17))

    @property
    def who(self) -> str:
        return f"worker {self.index}"

    def report(self, **fields: Any) -> WorkerReport:
        """This worker's :class:`~apam_gossip.messages.WorkerReport` (its timing, plus
        the mode's ``fields``)."""
        return WorkerReport(self.index, str(self.device), self.compute_s, self.sleep_s,
                            **fields)

    def gradient(self) -> tuple[float, int, float]:
        """One mini-batch gradient of the task's loss into ``flat.grads`` (the forward
        pass also moves the model's buffers, e.g. BatchNorm statistics, in ``flat.state``):
        (loss, n_samples, compute seconds).

        Raises :class:`Diverged` if the loss or the gradient is not finite. Then sleeps
        ``(factor - 1) x`` the compute time to emulate a slower machine, where factor is
        ``slowdown``, times ``straggler_factor`` with probability ``straggler_prob`` (a
        random straggler).
        """
        t = time.perf_counter()
        x, y = self.stream.next()
        self.flat.zero_grad()
        loss = compute_loss(self.task, self.model, x, y, self.who)
        loss.backward()
        if self.batches == 0:
            self.flat.check_gradients(f"model {self.task.model_name}")
        # one reduction instead of an elementwise isfinite (4x cheaper): a sum is NaN/inf
        # if any entry is (or if the gradient is ~1e38 large: divergence all the same);
        # loss and sum come back together: one wait for the device per step, not three
        # (a user's loss may come back on another device than the model: moved first)
        gsum_t = self.flat.grads.sum().double()
        value, gsum = torch.stack([loss.detach().to(gsum_t.device, torch.float64),
                                   gsum_t]).tolist()
        if not math.isfinite(value) or not math.isfinite(gsum):
            what = f"the loss is {value}" if not math.isfinite(value) \
                else "the gradient has non-finite entries"
            raise Diverged(f"{self.who}: {what} at its step {self.batches + 1}; the run "
                           "stopped (try a smaller learning rate)")
        dt = time.perf_counter() - t
        self.compute_s += dt
        self.batches += 1
        factor = self.slowdown
        if self.straggler_prob and self.rng is not None \
                and self.rng.random() < self.straggler_prob:
            factor *= self.straggler_factor
        if factor > 1.0:
            pause = (factor - 1.0) * dt
            time.sleep(pause)
            self.sleep_s += pause
        return value, batch_size_of(y), dt
