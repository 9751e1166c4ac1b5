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
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import RunConfig
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


def neighbor_picker(neighbors: list[int], probs: list[float], seed: int, alive=None):
    """A function returning a random neighbor (P(j) ~ probs), skipping dead ones when
    ``alive(j)`` says so; None when no neighbor is left."""
    rng = np.random.default_rng(seed)
    nb = np.asarray(neighbors)
    p = np.asarray(probs, dtype=np.float64)
    p = p / p.sum()

    def pick() -> int | None:
        j = int(rng.choice(nb, p=p))
        if alive is None or alive(j):
            return j
        live = [k for k, q in enumerate(p) if alive(int(nb[k]))]
        if not live:
            return None
        q = p[live] / p[live].sum()
        return int(nb[live][rng.choice(len(live), p=q)])

    return pick


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
        if link is not None:
            link.sleep(2 * link.seconds(end.worker, j))  # emulated link: model and back
        if end.average_with(j):
            return True, refusals
        refusals += 1
    return False, refusals


def gossip_worker_main(ctrl: Control, end: GossipEnd, cfg: RunConfig, task: Task, data: Any,
                shard: Tensor, device: str, neighbors: list[int], probs: list[float],
                total: int) -> None:
    """One gossip worker: gradient on a snapshot, pairwise average, local step."""
    i = end.worker
    w = LocalWorker.build(cfg, task, data, shard, i, torch.device(device))
    n_params, n_buffers = w.flat.n_params, w.flat.n_buffers
    tracked = cfg.adaptive_state == "tracked"
    rule = GossipRule(cfg.optim, end.n_workers, n_params, tracked)
    # where the transport keeps it (shm: shared, so the coordinator can checkpoint it; the
    # local step runs under this worker's lock), else private
    state = end.optimizer_state() or rule.init_state()
    grad_cpu = torch.zeros(n_params) if w.device.type != "cpu" else None
    buffers0 = torch.zeros(n_buffers, device=w.device) if n_buffers else None
    pick = neighbor_picker(neighbors, probs, worker_seed(cfg.seed, i) + 1, end.is_alive) \
        if neighbors else None
    link = LinkModel(cfg.network, 4 * (w.flat.numel + (n_params if tracked else 0)))
    # audit: the sum of this worker's local steps, to check that none was lost
    audit = torch.zeros(w.flat.numel, dtype=torch.float64) if cfg.audit else None
    staleness: Counter[int] = Counter()
    loss_sum, updates, samples, averages, refused = 0.0, 0, 0, 0, 0
    average = partial(average_with_a_neighbor, end, pick, link)

    # the communication thread (AD-PSGD's second thread): the average runs there while
    # this thread computes the gradient, so a link only costs time when it is slower
    # than a gradient. The math is the same either way: the gradient is taken at the
    # snapshot, the average and then the local step land on the current model.
    comm = ThreadPoolExecutor(1, thread_name_prefix=f"gossip-{i}") if cfg.overlap else None
    ctrl.send(Hello(i))
    if not end.wait_start(GO_TIMEOUT_S):
        raise TimeoutError(f"worker {i}: the coordinator did not start the run within "
                           f"{GO_TIMEOUT_S:g} s")
    while k := end.claim(total):  # k: this update's place in the global budget
        v0 = end.snapshot(w.flat.state)
        if buffers0 is not None:
            buffers0.copy_(w.flat.buffers)
        if comm is None:
            loss, n, _ = w.gradient()
            averaged, no = average()
        else:
            in_flight = comm.submit(average)
            try:
                loss, n, _ = w.gradient()
            finally:  # never leave an average running behind an error (the gradient's
                wait([in_flight])  # error, if any, is the one raised)
            averaged, no = in_flight.result()
        g = w.flat.grads
        if grad_cpu is not None:
            grad_cpu.copy_(g)
            g = grad_cpu
        delta = rule.buffer_delta(w.flat.buffers, buffers0)
        averages += averaged
        refused += no
        v1 = end.update_local(rule.step(g, state, rule.lr_at(k, total), delta, audit),
                              since=v0 + averaged)
        staleness[rule.staleness(v0, v1, averaged)] += 1
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
        audit=audit.numpy() if audit is not None else None,
        # tracked state: this worker's final running max, for the audit of u (only this
        # worker's local steps change vhat_i, so it is final now)
        audit_vhat=state["vhat"].double().numpy().copy() if audit is not None and tracked
        else None,
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
           "average_with_a_neighbor"]
