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
  transfer, its NIC carrying one model per neighbor;
* nodes, CPU contention on a node, NICs shared by a node's workers or with other jobs'
  traffic, congestion episodes and all-reduce overlapped with the backward pass:
  :class:`~apam_gossip.sim.hardware.Hardware` (none of it by default).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import NetworkConfig, RunConfig
from ..emulation import MASTER, LinkModel
from .engine import Engine, Resource
from .hardware import BACKWARD, DEFAULT, Congestion, Hardware, Node


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
    hardware: Hardware = DEFAULT
    nics: dict[tuple[int, str], Resource] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed * 7919 + 17)
        # lognormal with mean 1: sigma^2 = ln(1 + cv^2), mu = -sigma^2 / 2
        self._sigma = math.sqrt(math.log1p(self.gradient_cv ** 2))
        self._mu = -self._sigma ** 2 / 2
        hw = self.hardware
        shared = hw.background > 0 or hw.congestion > 0
        self.congestion = Congestion(hw, self.seed) if shared else None
        self.nodes: dict[int, Node] = {}
        # per master (shard): one entry per update waiting there, and whether it is busy
        self._master_queues: dict[int, deque] = {}
        self._master_busy: set[int] = set()

    @classmethod
    def of(cls, cfg: RunConfig, numel: int, gradient_s: float | Sequence[float],
           master_update_s: float, worker_update_s: float,
           gradient_cv: float = 0.0, hardware: Hardware = DEFAULT) -> Cluster:
        g = per_worker(gradient_s, cfg.workers)
        return cls(cfg.workers, g, [cfg.slowdown_of(i) for i in range(cfg.workers)],
                   cfg.straggler_prob, cfg.straggler_factor, LinkModel(cfg.network, 4 * numel),
                   4 * numel, master_update_s, worker_update_s, cfg.seed, gradient_cv,
                   hardware)

    # ------------------------------------------------------------------ compute
    def work_s(self, i: int) -> tuple[float, float]:
        """One gradient of worker ``i``: (its compute alone, noisy; the factor its emulated
        slowdown multiplies that by, a random straggler now and then)."""
        t = self.gradient_s[i]
        if self._sigma:
            t *= self.rng.lognormvariate(self._mu, self._sigma)
        factor = self.slowdown[i]
        if self.straggler_prob and self.rng.random() < self.straggler_prob:
            factor *= self.straggler_factor
        return t, factor

    def compute_s(self, i: int) -> float:
        """One gradient of worker ``i`` with no contention (its node's other work
        ignored; :meth:`gradient` is the contended one): :meth:`work_s`'s draws, in its
        order, multiplied as they always were (the default timings stay bit for bit)."""
        t = self.gradient_s[i] * self.slowdown[i]
        if self._sigma:
            t *= self.rng.lognormvariate(self._mu, self._sigma)
        if self.straggler_prob and self.rng.random() < self.straggler_prob:
            t *= self.straggler_factor
        return t

    def gradient(self, eng: Engine, i: int, then: Callable[[float], None],
                 scale: float = 1.0) -> None:
        """Start one gradient of worker ``i`` now (``scale`` x a full batch's compute) and
        call ``then(seconds it took)`` when it is done: computed on its node's cores,
        shared with whatever else runs there, then the emulated slowdown's sleep."""
        if not self.hardware.contended:
            c = self.compute_s(i) * scale
            eng.after(c, lambda: then(c))
            return
        work, factor = self.work_s(i)
        work *= scale

        def computed(dt: float) -> None:
            eng.after(dt * (factor - 1), lambda: then(dt * factor))
        self.node(eng, self.hardware.node_of(i)).run(work, computed)

    def round_s(self, works: list[tuple[float, float]],
                beside: Sequence[float] = ()) -> list[float]:
        """Lockstep modes: each worker's gradient time when all start together, given
        :meth:`work_s` of each (closed form of :class:`~.hardware.Node`'s sharing);
        ``beside``: other work starting with them on the master's node (an evaluation)."""
        if not self.hardware.contended:
            return [w * f for w, f in works]
        n = len(works)
        amounts = [w for w, _ in works] + list(beside)
        by_node: dict[int, list[int]] = {}
        for i in range(len(amounts)):
            node = self.hardware.node_of(i if i < n else MASTER)
            by_node.setdefault(node, []).append(i)
        out = [0.0] * len(amounts)
        for members in by_node.values():
            order = sorted(members, key=lambda i: amounts[i])
            t, done = 0.0, 0.0
            for k, i in enumerate(order):  # the least work finishes first; the rest share
                t += (amounts[i] - done) * self.hardware.factor(len(order) - k)
                done = amounts[i]
                out[i] = t * (works[i][1] if i < n else 1.0)
        return out[:n]

    def node_work(self, eng: Engine, work: float) -> None:
        """Start ``work`` seconds of compute on the master's node now (an evaluation by
        the coordinator beside it): it slows whatever else runs there."""
        self.node(eng, self.hardware.node_of(MASTER)).run(work, lambda dt: None)

    def node(self, eng: Engine, node: int) -> Node:
        if node not in self.nodes:
            self.nodes[node] = Node(eng, self.hardware.factor)
        return self.nodes[node]

    def master_update(self, eng: Engine, master: Resource, then: Callable[[], None],
                      work: float | None = None, shard: int = 0) -> None:
        """Queue one update (``master_update_s``, or ``work`` seconds) at the master (or
        at shard ``shard`` of a sharded master), one after another; ``then()`` when it is
        applied. ``master`` keeps the busy time. On a node shared with workers
        (``master_shares_node``) it competes for the cores."""
        work = self.master_update_s if work is None else work
        hw = self.hardware
        if not (hw.contended and hw.master_shares_node):
            eng.at(master.serve(eng.now, work), then)
            return
        self._master_queues.setdefault(shard, deque()).append((work, then))
        if shard not in self._master_busy:
            self._next_update(eng, master, shard)

    def _next_update(self, eng: Engine, master: Resource, shard: int) -> None:
        queue = self._master_queues[shard]
        work, then = queue.popleft()
        self._master_busy.add(shard)

        def applied(dt: float) -> None:
            master.busy_s += dt
            master.free_at = eng.now
            self._master_busy.discard(shard)
            if queue:
                self._next_update(eng, master, shard)
            then()
        self.node(eng, self.hardware.node_of(MASTER - shard)).run(work, applied)

    # ------------------------------------------------------------------ network
    def _node(self, i: int) -> int:
        return self.hardware.node_of(i) if self.hardware.shares_nics else i

    def _keep(self, i: int, t: float) -> float:
        return self.congestion.keep(self._node(i), t) if self.congestion else 1.0

    def _same_node(self, i: int, j: int) -> bool:
        return self._node(i) == self._node(j)

    def _intra_s(self, bits: float) -> float:
        rate = self.hardware.intra_node_gbps
        return bits / (rate * 1e9) if rate > 0 else 0.0

    def nic(self, i: int, direction: str) -> Resource:
        """The NIC of the node that holds ``i``, one direction (``"out"`` or ``"in"``)."""
        key = (self._node(i), direction)
        if key not in self.nics:
            self.nics[key] = Resource()
        return self.nics[key]

    def transfer(self, t: float, i: int, j: int, nbytes: int | None = None) -> float:
        """When a model (or ``nbytes``) sent from ``i`` to ``j`` at ``t`` has arrived: the
        sender's outgoing and the receiver's incoming NIC serialize it, each at its own
        rate and queued behind its earlier transfers, while the link carries it at the
        link's bottleneck rate; then the latency. So a fast master NIC takes many slow
        uploads at once, and a slow one queues them. Between two workers of one node it
        stays inside the node (``intra_node_gbps``)."""
        bits = (self.nbytes if nbytes is None else nbytes) * 8
        if self._same_node(i, j):
            return t + self._intra_s(bits)
        lat, bw = self.link.parts(i, j)
        keep = min(self._keep(i, t), self._keep(j, t)) if self.congestion else 1.0
        done = t + (bits / (bw * keep * 1e9) if bw > 0 else 0.0)
        for node, way in ((i, "out"), (j, "in")):
            rate = self.link.nic_gbps(node)
            if rate > 0:
                rate *= self._keep(node, t) if self.congestion else 1.0
                done = max(done, self.nic(node, way).serve(t, bits / (rate * 1e9)))
        return done + lat

    def hop_s(self, t: float, i: int, j: int, nbytes: int) -> float:
        """One message of ``nbytes`` from ``i`` to ``j`` at ``t`` with nothing else queued
        (a collective's step)."""
        if self._same_node(i, j):
            return self._intra_s(nbytes * 8)
        if not self.congestion:
            return self.link.seconds(i, j, nbytes)
        lat, bw = self.link.parts(i, j)
        caps = [bw] if bw > 0 else []
        caps += [r for r in (self.link.nic_gbps(i), self.link.nic_gbps(j)) if r > 0]
        if not caps:
            return lat
        keep = min(self._keep(i, t), self._keep(j, t))
        return lat + nbytes * 8 / (min(caps) * keep * 1e9)

    def allreduce_s(self, t: float = 0.0) -> float:
        """A ring all-reduce started at ``t``: 2(n-1) steps of nbytes/n, each as slow as the
        ring's slowest hop (hops inside a node are cheap: the ring visits nodes in order)."""
        n = self.n
        if not self.link.active or n < 2:
            return 0.0
        if not self.congestion and not self.hardware.shares_nics:
            return self.link.allreduce_seconds(n)
        worst = max(self.hop_s(t, i, (i + 1) % n, self.nbytes // n) for i in range(n))
        return 2 * (n - 1) * worst

    def exchange_s(self, i: int, neighbors: list[int], t: float = 0.0) -> float:
        """D-PSGD: node ``i`` sends its model to each neighbor and receives theirs. Costed
        per worker: the workers of one node sending at once do not queue at their shared
        NIC here (a simplification: up to ``workers_per_node`` x optimistic across nodes)."""
        if not neighbors:
            return 0.0
        if not self.congestion and not self.hardware.shares_nics:
            lat = max(self.link.parts(i, j)[0] for j in neighbors)
            ser = sum(self.link.seconds(i, j) - self.link.parts(i, j)[0] for j in neighbors)
            return lat + ser
        hops = [(self.hop_s(t, i, j, self.nbytes), 0.0 if self._same_node(i, j)
                 else self.link.parts(i, j)[0]) for j in neighbors]
        return max(lat for _, lat in hops) + sum(h - lat for h, lat in hops)

    def overlapped_round_s(self, compute_s: float, comm_s: float) -> float:
        """A lockstep round whose all-reduce is bucketed and overlapped with the slowest
        worker's backward pass (``allreduce_overlap``; see :mod:`.hardware`)."""
        buckets = max(1, math.ceil(self.nbytes / (self.hardware.bucket_mb * 1e6)))
        return max(compute_s + comm_s / buckets, compute_s * (1 - BACKWARD) + comm_s)


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
