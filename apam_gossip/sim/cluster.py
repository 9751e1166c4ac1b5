"""The cluster model of the simulator: how long each thing takes on a virtual cluster.

* a gradient of worker ``i``: ``gradient_s[i] x slowdown[i] x noise`` (times
  ``straggler_factor`` with probability ``straggler_prob``), where ``gradient_s`` is one
  gradient of the real model on this machine at full speed (:func:`calibrate`) or given,
  one for all workers or one per worker (repeating cyclically, like ``slowdown``),
  and ``noise`` is lognormal with mean 1 and coefficient of variation ``gradient_cv``
  (real gradient times vary; without it equal workers would move in lockstep, which
  real ones never do). Both draws come from one seeded generator;
* a transfer of the model from ``i`` to ``j`` (``-1`` the master): the link's latency
  plus the serialization time ``bytes x 8 / bandwidth``, on the sender's NIC (out) and
  the receiver's NIC (in) at once; each direction of a NIC is a FIFO server (full
  duplex): a node's concurrent sends queue, as do its concurrent receives, so all
  centralized traffic queues on the master's NIC (capped by ``master_bandwidth_gbps``).
  Latency and bandwidth are those of the run's ``network``
  (:class:`~apam_gossip.emulation.LinkModel`, the same the real runs emulate);
* the master applies one gradient in ``master_update_s`` (an optimizer step over the
  model: calibrated), one after the other; a worker's own optimizer step takes
  ``worker_update_s``;
* the synchronous collectives: a ring all-reduce is ``2(n-1)`` steps of ``bytes/n`` over the
  slowest link; D-PSGD's neighbor exchange lasts as long as a node's slowest neighbor
  transfer, its NIC carrying one model per neighbor.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import NetworkConfig, RunConfig
from ..emulation import LinkModel
from .engine import Resource


@dataclass
class Cluster:
    n: int
    gradient_s: list[float]  # per worker
    slowdown: list[float]
    straggler_prob: float
    straggler_factor: float
    link: LinkModel
    nbytes: int
    master_update_s: float
    worker_update_s: float
    seed: int = 0
    gradient_cv: float = 0.0
    nics: dict[tuple[int, str], Resource] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed * 7919 + 17)
        # lognormal with mean 1: sigma^2 = ln(1 + cv^2), mu = -sigma^2 / 2
        self._sigma = math.sqrt(math.log1p(self.gradient_cv ** 2))
        self._mu = -self._sigma ** 2 / 2

    @classmethod
    def of(cls, cfg: RunConfig, numel: int, gradient_s: float | Sequence[float],
           master_update_s: float, worker_update_s: float,
           gradient_cv: float = 0.0) -> Cluster:
        g = per_worker(gradient_s, cfg.workers)
        return cls(cfg.workers, g, [cfg.slowdown_of(i) for i in range(cfg.workers)],
                   cfg.straggler_prob, cfg.straggler_factor, LinkModel(cfg.network, 4 * numel),
                   4 * numel, master_update_s, worker_update_s, cfg.seed, gradient_cv)

    def compute_s(self, i: int) -> float:
        """One gradient of worker ``i`` (noisy; a random straggler now and then)."""
        t = self.gradient_s[i] * self.slowdown[i]
        if self._sigma:
            t *= self.rng.lognormvariate(self._mu, self._sigma)
        if self.straggler_prob and self.rng.random() < self.straggler_prob:
            t *= self.straggler_factor
        return t

    def nic(self, i: int, direction: str) -> Resource:
        """Node ``i``'s NIC, one direction (``"out"`` or ``"in"``)."""
        key = (i, direction)
        if key not in self.nics:
            self.nics[key] = Resource()
        return self.nics[key]

    def transfer(self, t: float, i: int, j: int, nbytes: int | None = None) -> float:
        """When a model (or ``nbytes``) sent from ``i`` to ``j`` at ``t`` has arrived: the
        sender's outgoing and the receiver's incoming NIC serialize it, each at its own
        rate and queued behind its earlier transfers, while the link carries it at the
        link's bottleneck rate; then the latency. So a fast master NIC takes many slow
        uploads at once, and a slow one queues them."""
        lat, bw = self.link.parts(i, j)
        bits = (self.nbytes if nbytes is None else nbytes) * 8
        done = t + (bits / (bw * 1e9) if bw > 0 else 0.0)
        for node, way in ((i, "out"), (j, "in")):
            rate = self.link.nic_gbps(node)
            if rate > 0:
                done = max(done, self.nic(node, way).serve(t, bits / (rate * 1e9)))
        return done + lat

    def allreduce_s(self) -> float:
        return self.link.allreduce_seconds(self.n)

    def exchange_s(self, i: int, neighbors: list[int]) -> float:
        """D-PSGD: node ``i`` sends its model to each neighbor and receives theirs."""
        if not neighbors:
            return 0.0
        lat = max(self.link.parts(i, j)[0] for j in neighbors)
        ser = sum(self.link.seconds(i, j) - self.link.parts(i, j)[0] for j in neighbors)
        return lat + ser


def per_worker(value: float | Sequence[float], n: int) -> list[float]:
    """One value per worker: a number for all, or a list repeating cyclically."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if not values:
        raise ValueError("an empty list of per-worker values")
    return [values[i % len(values)] for i in range(n)]


def calibrate(task: Any, data: Any, cfg: RunConfig, repeats: int = 10) -> tuple[float, float]:
    """(seconds per gradient, seconds per optimizer step) of the real model on this
    machine, one torch thread, median of ``repeats`` after a warm-up."""
    from ..algorithms.common import LocalWorker
    from ..optim import Optimizer
    from ..plan import RunPlan

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # compute only: one worker, no slowdown, no network (its per-worker lists and
        # links name workers a 1-worker config does not have)
        one = cfg.replace(workers=1, slowdown=[], straggler_prob=0.0,
                          network=NetworkConfig().model_dump())  # (replace merges tables)
        plan = RunPlan.of(one, data, task)
        w = LocalWorker.build(one, task, data, plan.shards[0], 0, torch.device("cpu"))
        for _ in range(3):
            w.gradient()
        grads = []
        for _ in range(repeats):
            t = time.perf_counter()
            w.gradient()
            grads.append(time.perf_counter() - t)
        opt = Optimizer(cfg.optim)
        state = opt.init(w.flat.params)
        ups = []
        for _ in range(repeats * 2):
            t = time.perf_counter()
            opt.update(w.flat.params, w.flat.grads, state)
            ups.append(time.perf_counter() - t)
        return statistics.median(grads), statistics.median(ups)
    finally:
        torch.set_num_threads(threads)
