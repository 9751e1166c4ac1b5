"""Decentralized training: AD-PSGD-style gossip with local adaptive steps.

No master. Every worker ``i`` repeats::

    x_hat = snapshot of x_i                      # the gradient point (stale by design)
    g = minibatch gradient at x_hat
    j = random neighbor on the topology         # P(j) = w_ij / sum_k w_ik
    x_i, x_j <- (x_i + x_j) / 2                  # atomic pairwise average
    x_i <- x_i - step(g)                         # local AMSGrad (or SGD) step

The local step is applied to the *current* x_i (which may have been averaged by
neighbors since the snapshot), never to x_hat, so no average is undone and, because the
step and every average that touches x_i hold x_i's lock, no local step is lost to a
concurrent average. Deadlock freedom on any connected graph comes from lock ordering
(see :class:`apam_gossip.transport.shm.ShmGossip`): a worker never waits for another
worker's *cooperation*, only for a short critical section that always completes.

Adaptive state (``RunConfig.adaptive_state``):

* ``local`` (default): AMSGrad moments m, v, vhat stay private to each worker (DADAM-like);
* ``tracked``: a second-moment estimate u_i is averaged together with x_i and moved by
  each local change of vhat (DAMSGrad; see :func:`apam_gossip.optim.damsgrad_step`),
  which fixes the possible non-convergence of purely local adaptive state;
* with ``optim.name = "sgd"`` the local step is plain SGD, AD-PSGD as in its paper.

With ``RunConfig.audit`` every worker also sums the exact changes its local steps made,
and the coordinator checks the invariant of pairwise averaging at the end:
``sum_i x_i(end) == sum_i x_i(0) + sum of all local steps`` (a lost step, or an average
that overwrote one, breaks it); the relative error is reported as ``audit_error``. With a
tracked ``u``, averages leave ``sum_i u_i`` unchanged and a local step moves ``u_i`` and
``vhat_i`` by the same amount, so ``sum_i (u_i - vhat_i)`` never changes (it is 0 from a
fresh start): its relative error is ``audit_u_error``. (A run resumed from a checkpoint
audits from the checkpoint's models on.)

Staleness here is the number of writes to x_i (averages by either side) between the
snapshot and the local step.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import RunConfig
from ..core.compress import parse_compress
from ..core.gossip import GossipRule
from ..emulation import LinkModel
from ..messages import Hello, WorkerReport
from ..task import Task
from ..transport import Control, GossipEnd
from .common import LocalWorker, worker_seed

GO_TIMEOUT_S = 300.0
# an average the peer refuses (MPI: it was mid-average) is tried again with a fresh
# neighbor, this many tries in all, before the step goes on without one
AVERAGE_TRIES = 3


class NeighborPicker:
    """A random neighbor for each average, P(j) ~ ``probs`` (the topology's weights), a
    dead one skipped when ``alive(j)`` says so; called, it returns None when no neighbor
    is left. ``choice="fast"`` (``--neighbour-choice fast``): neighbors whose averages
    complete sooner are preferred, ``P(j) = (1 - FLOOR) * w_j / t_j / sum_k (w_k / t_k)
    + FLOOR * w_j``, where ``t_j`` is an exponential average (:attr:`EMA`) of the
    seconds an average with ``j`` took (:meth:`observe`; a neighbor not yet measured
    counts as the fastest measured, so each is tried): every edge keeps at least
    ``FLOOR`` of its uniform share, so the graph stays connected and mixing cannot
    collapse onto one pair. :attr:`counts` is the distribution it chose."""

    FLOOR = 0.25
    EMA = 0.3

    def __init__(self, neighbors: list[int], probs: list[float], seed: int, alive=None,
                 choice: str = "uniform") -> None:
        self.rng = np.random.default_rng(seed)
        self.nb = np.asarray(neighbors)
        p = np.asarray(probs, dtype=np.float64)
        self.w = p / p.sum()
        self.alive, self.fast = alive, choice == "fast"
        self.seconds: dict[int, float] = {}
        self.counts: Counter[int] = Counter()

    def observe(self, j: int, seconds: float) -> None:
        """An average with ``j`` took ``seconds`` (only ``fast`` uses it)."""
        old = self.seconds.get(j)
        self.seconds[j] = seconds if old is None else old + self.EMA * (seconds - old)

    def probabilities(self) -> np.ndarray:
        if not self.fast or not self.seconds:
            return self.w
        live = [t for j, t in self.seconds.items()
                if self.alive is None or self.alive(j)]
        best = min(live) if live else min(self.seconds.values())
        t = np.array([max(self.seconds.get(int(j), best), 1e-9) for j in self.nb])
        speed = self.w / t
        return (1 - self.FLOOR) * speed / speed.sum() + self.FLOOR * self.w

    def __call__(self) -> int | None:
        p = self.probabilities()
        j = int(self.rng.choice(self.nb, p=p))
        if self.alive is not None and not self.alive(j):
            live = [k for k in range(len(p)) if self.alive(int(self.nb[k]))]
            if not live:
                return None
            q = p[live] / p[live].sum()
            j = int(self.nb[live][self.rng.choice(len(live), p=q)])
        self.counts[j] += 1
        return j


def neighbor_picker(neighbors: list[int], probs: list[float], seed: int, alive=None,
                    choice: str = "uniform") -> NeighborPicker:
    """A :class:`NeighborPicker` (the function every driver calls)."""
    return NeighborPicker(neighbors, probs, seed, alive, choice)


def average_with_a_neighbor(end: GossipEnd, pick, link: LinkModel | None = None
                             ) -> tuple[bool, int]:
    """One average with a neighbor from ``pick`` (None, or a pick of None: no live
    neighbor left); a refusal (the neighbor was mid-average) is retried with a fresh
    pick, :data:`AVERAGE_TRIES` in all. ``link``: sleep the emulated transfer there and
    back first. Returns (whether it averaged, how many refusals)."""
    refusals = 0
    for _ in range(AVERAGE_TRIES):
        j = pick() if pick is not None else None
        if j is None:  # every neighbor died: keep training alone
            break
        t = time.perf_counter()
        if link is not None:
            link.sleep(2 * link.seconds(end.worker, j))  # emulated link: model and back
        done = end.average_with(j)
        if done and hasattr(pick, "observe"):  # (--neighbour-choice fast learns from it;
            # a refusal is quick because the peer was busy: not a fast neighbour)
            pick.observe(j, time.perf_counter() - t)
        if done:
            return True, refusals
        refusals += 1
    return False, refusals


class OverlapChoice:
    """Whether a worker's average runs beside its next gradient (AD-PSGD's second thread)
    or after it, for ``allowed`` = True (always beside), False (never) or None (measured).

    Measured: after :attr:`WARMUP` untimed steps, ``2 * PROBE`` steps alternate between
    the two ways (so a drift over those steps, an evaluation or a straggler, weighs on
    both alike), and the faster way by median step time is kept for the rest of the run.
    The thread pays when the link is slow next to the gradient and a core is free for
    it; it costs when the cores are all busy computing or when its hand-offs cost more
    than the average (a small model on a GPU): both seen (issue 21), so neither way is a
    safe default. The math is the same either way. A refused average makes a step
    cheaper, so where one way is refused more often (MPI) the median leans to it."""

    WARMUP = 2
    PROBE = 8

    def __init__(self, allowed: bool | None) -> None:
        self.decided: bool | None = allowed
        self.times: dict[bool, list[float]] = {False: [], True: []}
        self.steps = 0

    def now(self) -> bool:
        """Whether this step overlaps."""
        if self.decided is not None:
            return self.decided
        return self.steps >= self.WARMUP and (self.steps - self.WARMUP) % 2 == 1

    def record(self, overlapped: bool, seconds: float) -> None:
        """One step took ``seconds``, overlapped or not."""
        self.steps += 1
        if self.decided is not None or self.steps <= self.WARMUP:
            return
        self.times[overlapped].append(seconds)
        if len(self.times[True]) == self.PROBE == len(self.times[False]):
            self.decided = statistics.median(self.times[True]) \
                < statistics.median(self.times[False])

    def kept(self) -> bool | None:
        """What the report says: the way kept; False for a run that ended before its
        first overlapped step; None for one that ended mid-probe (it ran both ways)."""
        if self.decided is not None:
            return self.decided
        return None if self.times[True] else False

    def measured(self) -> dict[str, float] | None:
        """The probe's median step times (seconds), once both ways were timed."""
        if not self.times[True] or not self.times[False]:
            return None
        return {"sequential_s": statistics.median(self.times[False]),
                "overlapped_s": statistics.median(self.times[True])}


def on_stream(fn, stream):
    """``fn`` run with ``stream`` as the thread's current CUDA stream (None: as is)."""
    if stream is None:
        return fn

    def run():
        with torch.cuda.stream(stream):
            return fn()
    return run


def gossip_worker_main(ctrl: Control, end: GossipEnd, cfg: RunConfig, task: Task, data: Any,
                shard: Tensor, device: str, neighbors: list[int], probs: list[float],
                total: int) -> None:
    """One gossip worker: gradient on a snapshot, pairwise average, local step.

    The local step runs where the transport keeps x_i (``end.device``): on shared memory,
    the worker's own device (its GPU: no copy through the host); under MPI, the host
    buffer MPI sends from."""
    i = end.worker
    w = LocalWorker.build(cfg, task, data, shard, i, torch.device(device))
    n_params, n_buffers = w.flat.n_params, w.flat.n_buffers
    tracked = cfg.adaptive_state == "tracked"
    rule = GossipRule(cfg.optim, end.n_workers, n_params, tracked)
    sdev = end.device
    # where the transport keeps it (shm: shared, so the coordinator can checkpoint it; the
    # local step runs under this worker's lock), else private
    state = end.optimizer_state() or rule.init_state(sdev)
    grad_out = torch.zeros(n_params, device=sdev) if w.device != sdev else None
    buffers0 = torch.zeros(n_buffers, device=w.device) if n_buffers else None
    pick = neighbor_picker(neighbors, probs, worker_seed(cfg.seed, i) + 1, end.is_alive,
                           cfg.neighbour_choice) if neighbors else None
    comp = parse_compress(cfg.compress)
    # what one direction of an average carries: the model (and u), or a packet
    link = LinkModel(cfg.network, comp.nbytes(w.flat.numel) if comp is not None
                     else 4 * (w.flat.numel + (n_params if tracked else 0)))
    # audit: the sum of this worker's local steps, to check that none was lost
    audit = torch.zeros(w.flat.numel, dtype=torch.float64, device=sdev) if cfg.audit else None
    staleness: Counter[int] = Counter()
    loss_sum, updates, samples, averages, refused = 0.0, 0, 0, 0, 0
    average = partial(average_with_a_neighbor, end, pick, link)

    # the communication thread (AD-PSGD's second thread): the average runs there while
    # this thread computes the gradient, so a link only costs time when it is slower
    # than a gradient. The math is the same either way: the gradient is taken at the
    # snapshot, the average and then the local step land on the current model. On a GPU
    # the thread's average runs on its own CUDA stream, so it never queues behind (or
    # holds up) the gradient's kernels; see apam_gossip.transport.rows for its ordering.
    choice = OverlapChoice(cfg.overlap)
    comm = ThreadPoolExecutor(1, thread_name_prefix=f"gossip-{i}") \
        if cfg.overlap is not False else None
    comm_stream = torch.cuda.Stream(sdev) if comm is not None and sdev.type == "cuda" \
        else None
    beside = on_stream(average, comm_stream)
    ctrl.send(Hello(i))
    if not end.wait_start(GO_TIMEOUT_S):
        raise TimeoutError(f"worker {i}: the coordinator did not start the run within "
                           f"{GO_TIMEOUT_S:g} s")
    while k := end.claim(total):  # k: this update's place in the global budget
        t_step = time.perf_counter()
        v0 = end.snapshot(w.flat.state)
        if buffers0 is not None:
            buffers0.copy_(w.flat.buffers)
        overlapped = comm is not None and choice.now()
        if not overlapped:
            loss, n, _ = w.gradient()
            averaged, no = average()
        else:
            in_flight = comm.submit(beside)
            try:
                loss, n, _ = w.gradient()
            finally:  # never leave an average running behind an error (the gradient's
                wait([in_flight])  # error, if any, is the one raised)
            averaged, no = in_flight.result()
        g = w.flat.grads
        if grad_out is not None:
            grad_out.copy_(g)
            g = grad_out
        delta = rule.buffer_delta(w.flat.buffers, buffers0, sdev)
        averages += averaged
        refused += no
        v1 = end.update_local(rule.step(g, state, rule.lr_at(k, total), delta, audit),
                              since=v0 + averaged)
        staleness[rule.staleness(v0, v1, averaged)] += 1
        choice.record(overlapped, time.perf_counter() - t_step)
        updates += 1
        samples += n
        loss_sum += loss
        end.report_loss(loss)
    if comm is not None:
        comm.shutdown()
    ctrl.send(w.report(
        updates=updates, samples=samples, averages=averages, refused_averages=refused,
        staleness=dict(staleness),
        finished_at=time.monotonic(), train_loss=(loss_sum, updates),
        # numpy (pickled by value), never a torch tensor (see apam_gossip.messages)
        audit=audit.cpu().numpy() if audit is not None else None,
        # tracked state: this worker's final running max, for the audit of u (only this
        # worker's local steps change vhat_i, so it is final now)
        audit_vhat=state["vhat"].double().cpu().numpy().copy()
        if audit is not None and tracked else None,
        overlap=choice.kept(), overlap_probe=choice.measured(),
        neighbours=dict(pick.counts) if pick is not None else None,
    ))


def consensus_worker_main(ctrl: Control, end: GossipEnd, neighbors: list[int],
                       probs: list[float], averages: int, seed: int) -> None:
    """Gossip only (no gradients): ``averages`` pairwise averages with random neighbors."""
    pick = neighbor_picker(neighbors, probs, seed) if neighbors else None
    ctrl.send(Hello(end.worker))
    if not end.wait_start(GO_TIMEOUT_S):
        raise TimeoutError(f"worker {end.worker}: no start signal within {GO_TIMEOUT_S:g} s")
    for _ in range(averages if pick is not None else 0):
        end.average_with(pick())
        # stands in for the gradient computation between averages; without it a worker
        # would do hundreds of averages with the same neighbors in one time slice
        os.sched_yield()
    ctrl.send(WorkerReport(end.worker, "cpu", 0.0, 0.0))


__all__ = ["gossip_worker_main", "consensus_worker_main", "neighbor_picker",
           "average_with_a_neighbor", "OverlapChoice"]
