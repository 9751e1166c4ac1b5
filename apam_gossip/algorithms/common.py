"""What every worker of every mode does: build its model, draw batches, compute gradients.

Seeds: the initial model is drawn from ``torch.manual_seed(seed)``; worker ``i`` draws its
batches from :class:`~apam_gossip.data.BatchStream` seeded with ``worker_seed(seed, i)``.
A 1-worker asynchronous run therefore sees exactly the batches of the sequential run.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RunConfig
from ..data import BatchStream, Dataset
from ..flat import FlatParams, flatten
from ..messages import WorkerReport
from ..models import build_model


def worker_seed(seed: int, worker: int) -> int:
    return seed * 1_000_003 + 7919 * (worker + 1)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(cfg: RunConfig, n_procs: int) -> int:
    """Torch threads for each of ``n_procs`` computing processes: a fair share of the cores."""
    if cfg.threads_per_worker is not None:
        return cfg.threads_per_worker
    return max(1, available_cores() // n_procs)


def device_for(cfg: RunConfig, worker: int) -> torch.device:
    """cuda:(worker mod n_gpus) when CUDA is wanted and present, else the CPU."""
    if cfg.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", worker % torch.cuda.device_count())
    return torch.device("cpu")


def eval_points(total: int, evals: int) -> list[int]:
    """Update counts at which to evaluate: 0, then ``evals`` evenly spaced up to ``total``."""
    evals = min(evals, total)  # no more evaluation points than updates
    pts = sorted({round(total * j / evals) for j in range(1, evals + 1)} | {0})
    return pts


def initial_model(cfg: RunConfig, dataset: Dataset) -> Tensor:
    """The seeded initial flat parameter vector (on the CPU)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, dataset.in_shape, dataset.n_classes)
    return flatten(model, "cpu").params.detach().clone()


def compute_gradient(model: nn.Module, flat: FlatParams, x: Tensor, y: Tensor) -> float:
    """Cross-entropy gradient of one mini-batch into ``flat.grads``; returns the loss."""
    flat.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return float(loss.detach())


@dataclass
class LocalWorker:
    """A worker's model, flat buffers and batch stream on its device."""

    index: int
    device: torch.device
    model: nn.Module
    flat: FlatParams
    stream: BatchStream
    slowdown: float = 1.0
    straggler_prob: float = 0.0
    straggler_factor: float = 1.0
    rng: random.Random | None = None
    compute_s: float = 0.0
    sleep_s: float = 0.0
    batches: int = 0

    @classmethod
    def build(cls, cfg: RunConfig, dataset: Dataset, shard: Tensor, index: int,
              device: torch.device) -> LocalWorker:
        model = build_model(cfg.model, dataset.in_shape, dataset.n_classes).to(device)
        flat = flatten(model, device)
        if device.type == "cpu":
            stream = BatchStream(dataset.x_train, dataset.y_train, shard,
                                 cfg.data.batch_size, worker_seed(cfg.seed, index))
        else:  # keep the shard resident on the GPU: no host->device copy per batch
            xs = dataset.x_train[shard].to(device)
            ys = dataset.y_train[shard].to(device)
            stream = BatchStream(xs, ys, torch.arange(len(shard)), cfg.data.batch_size,
                                 worker_seed(cfg.seed, index))
        return cls(index, device, model, flat, stream, cfg.slowdown_of(index),
                   cfg.straggler_prob, cfg.straggler_factor,
                   random.Random(worker_seed(cfg.seed, index) + 17))

    def report(self, **fields: Any) -> WorkerReport:
        """This worker's :class:`~apam_gossip.messages.WorkerReport` (its timing, plus
        the mode's ``fields``)."""
        return WorkerReport(self.index, str(self.device), self.compute_s, self.sleep_s,
                            **fields)

    def gradient(self) -> tuple[float, int, float]:
        """One mini-batch gradient into ``flat.grads``: (loss, n_samples, compute seconds).

        Then sleeps ``(factor - 1) x`` the compute time to emulate a slower machine, where
        factor is ``slowdown``, times ``straggler_factor`` with probability
        ``straggler_prob`` (a random straggler).
        """
        t = time.perf_counter()
        x, y = self.stream.next()
        loss = compute_gradient(self.model, self.flat, x, y)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
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
        return loss, int(y.shape[0]), dt
