"""What the cluster's nodes and network are like, beyond per-link latency and bandwidth.

Everything here is optional; a profile without it (``Hardware()``) is the simulator as it
was: every worker alone on its own node, every NIC dedicated to the run.

**Nodes and contention.** Workers are placed on nodes, ``workers_per_node`` each, in rank
order (worker ``i`` on node ``i // workers_per_node``); the master (centralized, syncps)
has a node of its own unless ``master_shares_node`` puts it on node 0, as on one machine,
with the coordinator, whose evaluations during the run (``eval_samples`` test samples at
each evaluation point, timed alone here; not with ``model_params``) are work there too.
A node has ``cores_per_node`` cores. Its processes share them as a *processor-sharing*
server: while ``k`` of its processes compute, each progresses at ``1 / factor(k)`` of its
speed alone, where

* ``factor(k) = contention[k - 1]`` for ``k <= len(contention)`` (measured: the per-batch
  time of ``k`` co-running one-thread workers over that of one alone, ``bench contention``;
  memory bandwidth, shared caches and turbo make it > 1 below the core count);
* ``factor(k) = contention[-1]`` up to the core count, beyond the measured points (no
  further slowdown known: an optimistic assumption, stated);
* ``factor(k) = factor(m) x k / m`` past ``m = max(len(contention), cores_per_node)``:
  more processes than cores time-share them.

A gradient is compute work of ``gradient_s x noise`` (seconds alone) on its worker's node;
an emulated slowdown is a sleep of ``(slowdown - 1) x`` the compute time it took, as the
real workers do (:meth:`apam_gossip.algorithms.common.LocalWorker.gradient`), and sleeps
use no core. The master's update is compute work on the master's node, one at a time.
Without ``contention`` and ``cores_per_node`` nothing is shared: ``factor = 1``;
``cores_per_node`` alone is pure time-sharing (``factor = 1`` up to the cores, ``k /
cores`` past them).

**Networks as they are.** Several workers behind one NIC: with ``workers_per_node > 1``
each node has one NIC (both directions FIFO, as before) that its workers' transfers share;
transfers between workers of the same node cost ``intra_node_gbps`` (0 = free: shared
memory, NVLink). ``nic_per_worker = true`` keeps nodes for the cores only: every worker
and the master keep their own NIC and links, as the real runs on one machine whose
network is emulated per process (the validation profiles ``launch/profile_contended*``).
A NIC shared with other jobs' traffic keeps ``1 - background`` of its rate. Congestion
episodes: each node's NIC is congested a fraction ``congestion`` of the time, in
episodes of mean ``congestion_s`` seconds (exponential lengths, seeded per node), keeping
``congestion_keep`` of its rate meanwhile; a transfer runs at the rates in force when it
starts. A ring all-reduce runs at the slowest node's rate at the start of the
collective (a ring is as fast as its slowest hop).

**All-reduce overlapped with the backward pass** (``allreduce_overlap``, as DDP and Horovod
do): the gradients are reduced in buckets of ``bucket_mb`` as the backward pass produces
them. With ``B`` buckets, a collective of ``C`` seconds and the slowest worker's gradient of
``c`` seconds, a round lasts ``max(c + C / B, c x (1 - BACKWARD) + C)``: no bucket before
the backward pass starts (``BACKWARD`` = 2/3 of a gradient, the usual forward:backward
ratio of 1:2), the last bucket not before it ends.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError

# the backward pass's share of a gradient's time (forward:backward about 1:2)
BACKWARD = 2 / 3
# DDP's default bucket (torch.nn.parallel.DistributedDataParallel, bucket_cap_mb)
BUCKET_MB = 25.0


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Hardware:
    """Nodes, contention and the network's sharing (see the module docstring)."""

    workers_per_node: int = 1
    cores_per_node: int = 0  # 0: as many as the contention curve is long
    contention: tuple[float, ...] | str = ()  # factors for 1.. co-running, or "measure"
    master_shares_node: bool = False
    intra_node_gbps: float = 0.0
    background: float = 0.0
    congestion: float = 0.0
    congestion_s: float = 1.0
    congestion_keep: float = 0.1
    allreduce_overlap: bool = False
    bucket_mb: float = BUCKET_MB
    nic_per_worker: bool = False

    def __post_init__(self) -> None:
        def bad(key: str, want: str, got: Any) -> ConfigError:
            return ConfigError(f"[simulate] {key} must be {want}, got {got!r}")

        if not _int(self.workers_per_node) or self.workers_per_node < 1:
            raise bad("workers_per_node", "a whole number >= 1", self.workers_per_node)
        if not _int(self.cores_per_node) or self.cores_per_node < 0:
            raise bad("cores_per_node", "a whole number >= 0 (0: as many as the contention "
                      "curve is long)", self.cores_per_node)
        c = self.contention
        if isinstance(c, str):
            if c != "measure":
                raise bad("contention", 'a list of factors (1.0 first) or "measure"', c)
        elif not isinstance(c, (list, tuple)):
            raise bad("contention", 'a list of factors (1.0 first) or "measure"', c)
        elif not all(_num(f) and 1.0 <= f <= 1e3 for f in c) or (c and abs(c[0] - 1) > 1e-9):
            raise bad("contention", "factors >= 1 starting with 1.0 (one co-running worker: "
                      "its speed alone)", list(c))
        for key in ("background", "congestion"):
            v = getattr(self, key)
            if not _num(v) or not 0 <= v < 1:
                raise bad(key, "a fraction in [0, 1)", v)
        if not _num(self.congestion_keep) or not 0 < self.congestion_keep <= 1:
            raise bad("congestion_keep", "a fraction in (0, 1]", self.congestion_keep)
        for key in ("congestion_s", "bucket_mb"):
            v = getattr(self, key)
            if not _num(v) or not 0 < v <= 1e7:
                raise bad(key, "a number > 0", v)
        if not _num(self.intra_node_gbps) or self.intra_node_gbps < 0:
            raise bad("intra_node_gbps", "Gbit/s >= 0 (0: free)", self.intra_node_gbps)
        if not isinstance(self.master_shares_node, bool):
            raise bad("master_shares_node", "true or false", self.master_shares_node)
        for key in ("allreduce_overlap", "nic_per_worker"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "true or false", getattr(self, key))

    @classmethod
    def of(cls, table: dict[str, Any]) -> Hardware:
        """From a [simulate] table's hardware keys (:data:`HARDWARE_KEYS`)."""
        kw = dict(table)
        if isinstance(kw.get("contention"), list):
            kw["contention"] = tuple(kw["contention"])
        return cls(**kw)

    @property
    def contended(self) -> bool:
        """Whether a node's processes share its cores: a contention curve, or
        ``cores_per_node`` alone (then pure time-sharing: factor 1 up to the cores)."""
        if self.contention == "measure":
            return False
        return bool(self.contention) or self.cores_per_node > 0

    def with_curve(self, curve: Sequence[float]) -> Hardware:
        d = {k: getattr(self, k) for k in HARDWARE_KEYS}
        d["contention"] = tuple(curve)
        return Hardware(**d)

    def factor(self, k: int) -> float:
        """The slowdown of each of ``k`` processes computing at once on one node."""
        if not self.contended:
            return 1.0
        curve = self.contention or (1.0,)
        assert isinstance(curve, tuple)
        if k <= len(curve):
            return curve[max(k, 1) - 1]
        m = max(len(curve), self.cores_per_node)
        if k <= m:
            return curve[-1]
        return curve[-1] * k / m

    @property
    def shares_nics(self) -> bool:
        """Whether processes of one node share a NIC (and talk inside the node)."""
        return not self.nic_per_worker and (self.workers_per_node > 1
                                            or self.master_shares_node)

    def node_of(self, worker: int) -> int:
        """Worker ``i``'s node; the master (-1; a sharded master's shard k: -1 - k) is on
        node 0 or on its own (its id)."""
        if worker < 0:
            return 0 if self.master_shares_node else worker
        return worker // self.workers_per_node

    def describe(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k in HARDWARE_KEYS if (v := getattr(self, k)) != getattr(DEFAULT, k)}


HARDWARE_KEYS = ("workers_per_node", "cores_per_node", "contention", "master_shares_node",
                 "intra_node_gbps", "background", "congestion", "congestion_s",
                 "congestion_keep", "allreduce_overlap", "bucket_mb", "nic_per_worker")
DEFAULT = Hardware()


class Congestion:
    """Each node's NIC alternates between normal and congested episodes (exponential
    lengths, seeded per node): :meth:`keep` is the fraction of its rate at time ``t``."""

    def __init__(self, hw: Hardware, seed: int) -> None:
        self.hw = hw
        self.seed = seed
        self._timelines: dict[int, tuple[random.Random, list[float]]] = {}

    def keep(self, node: int, t: float) -> float:
        hw = self.hw
        base = 1.0 - hw.background
        if hw.congestion <= 0:
            return base
        rng, edges = self._timelines.setdefault(
            node, (random.Random(self.seed * 1_000_003 + node * 7919 + 5), [0.0]))
        # edges[k] starts episode k: even k normal, odd k congested; mean lengths such that
        # a fraction `congestion` of the time is congested
        normal_s = hw.congestion_s * (1 - hw.congestion) / hw.congestion
        while edges[-1] <= t:
            mean = normal_s if len(edges) % 2 == 1 else hw.congestion_s
            edges.append(edges[-1] + rng.expovariate(1 / mean))
        k = _bisect(edges, t)
        return base * (hw.congestion_keep if k % 2 == 1 else 1.0)


def _bisect(edges: list[float], t: float) -> int:
    lo, hi = 0, len(edges) - 1
    while lo < hi:  # the last edge <= t
        mid = (lo + hi + 1) // 2
        if edges[mid] <= t:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Node:
    """A node's cores as a processor-sharing server on the engine's clock: :meth:`run`
    starts ``work`` seconds (alone) of compute and calls ``done(elapsed)`` when it is
    finished, every running job slowed by ``factor(jobs running)``."""

    def __init__(self, engine: Any, factor: Callable[[int], float]) -> None:
        self.eng = engine
        self.factor = factor
        self.jobs: dict[int, list] = {}  # id -> [work left, started at, done]
        self._ids = 0
        self._last = 0.0
        self._token = 0

    def run(self, work: float, done: Callable[[float], None]) -> None:
        self._advance()
        self._ids += 1
        self.jobs[self._ids] = [work, self.eng.now, done]
        self._schedule()

    def _rate(self) -> float:
        return 1.0 / self.factor(len(self.jobs))

    def _advance(self) -> None:
        now = self.eng.now
        if self.jobs and now > self._last:
            step = (now - self._last) * self._rate()
            for job in self.jobs.values():
                job[0] -= step
        self._last = now

    def _schedule(self) -> None:
        self._token += 1
        if not self.jobs:
            return
        token = self._token
        left = min(job[0] for job in self.jobs.values())
        self.eng.at(self.eng.now + max(left, 0.0) / self._rate(),
                    lambda: self._finish(token))

    def _finish(self, token: int) -> None:
        if token != self._token:
            return  # the set of running jobs changed since: rescheduled
        self._advance()
        now = self.eng.now
        first = min(job[0] for job in self.jobs.values())
        ready = [k for k, job in self.jobs.items() if job[0] <= first + 1e-12]
        finished = [self.jobs.pop(k) for k in ready]
        self._schedule()
        for _, started, done in finished:
            done(now - started)


__all__ = ["Hardware", "HARDWARE_KEYS", "Node", "Congestion", "BACKWARD", "BUCKET_MB"]
