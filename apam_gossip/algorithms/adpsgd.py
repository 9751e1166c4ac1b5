"""Decentralized training: AD-PSGD-style gossip with local adaptive steps.

No master. Every worker ``i`` repeats::

    x_hat = snapshot of x_i                      # the gradient point (stale by design)
    g = minibatch gradient at x_hat
    j = random neighbour on the topology         # P(j) = w_ij / sum_k w_ik
    x_i, x_j <- (x_i + x_j) / 2                  # atomic pairwise average
    x_i <- x_i - step(g)                         # local AMSGrad (or SGD) step

The local step is applied to the *current* x_i (which may have been averaged by
neighbours since the snapshot), never to x_hat, so no average is undone and, because the
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
from functools import partial
from multiprocessing.connection import Connection

import numpy as np
import torch
from torch import Tensor

from ..config import RunConfig
from ..data import Dataset
from ..emulation import LinkModel
from ..transport.shm import ShmGossip, ShmGossipEnd
from .common import LocalWorker, worker_seed

GO_TIMEOUT_S = 300.0


def _neighbors_rng(neighbors: list[int], probs: list[float], seed: int, alive=None):
    """A function returning a random neighbour (P(j) ~ probs), skipping dead ones when
    ``alive(j)`` says so; None when no neighbour is left."""
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


def _local_step(opt, g: Tensor, state, tracked: bool, audit: Tensor | None, lr: float,
                x: Tensor, u: Tensor | None) -> None:
    if audit is not None:
        audit.sub_(x)
    opt.update(x, g, state, lr=lr, tracked=u if tracked else None)
    if audit is not None:
        audit.add_(x)  # audit accumulates x_after - x_before: exactly this step


def worker_main(ctrl: Connection, end: ShmGossipEnd, cfg: RunConfig, dataset: Dataset,
                shard: Tensor, device: str, neighbors: list[int], probs: list[float],
                total: int) -> None:
    """One gossip worker: gradient on a snapshot, pairwise average, local step."""
    i = end.worker
    w = LocalWorker.build(cfg, dataset, shard, i, torch.device(device))
    opt = cfg.optim.build()
    shared = getattr(end, "optimizer_state", lambda: None)()
    # shared (shm): the coordinator can checkpoint it; the local step runs under our lock
    state = shared if shared is not None else opt.init(torch.zeros(w.flat.numel))
    grad_cpu = torch.zeros(w.flat.numel) if w.device.type != "cpu" else None
    alive = getattr(end, "is_alive", None)
    pick = _neighbors_rng(neighbors, probs, worker_seed(cfg.seed, i) + 1, alive) \
        if neighbors else None
    tracked = cfg.adaptive_state == "tracked"
    link = LinkModel(cfg.network, 4 * w.flat.numel * (2 if tracked else 1))
    # audit: the sum of this worker's local steps, to check that none was lost
    audit = torch.zeros(w.flat.numel, dtype=torch.float64) if cfg.audit else None
    staleness: Counter[int] = Counter()
    loss_sum, updates, samples, averages = 0.0, 0, 0, 0
    ctrl.send(("hello", i))
    if not end.go.wait(GO_TIMEOUT_S):
        raise TimeoutError(f"worker {i}: the coordinator did not start the run within "
                           f"{GO_TIMEOUT_S:g} s")
    t0 = time.monotonic()
    while k := end.claim(total):  # k: this update's place in the global budget
        v0 = end.snapshot(w.flat.params)
        loss, n, _ = w.gradient()
        g = w.flat.grads
        if grad_cpu is not None:
            grad_cpu.copy_(g)
            g = grad_cpu
        j = pick() if pick is not None else None
        if j is not None:  # None: every neighbour died; keep training alone
            link.sleep(2 * link.seconds(i, j))  # emulated link: model there and back
            end.average_with(j)
            averages += 1

        v1 = end.update_local(partial(_local_step, opt, g, state, tracked, audit,
                                      opt.lr_at(k, total)))
        staleness[v1 - v0 - 1 - (1 if j is not None else 0)] += 1
        updates += 1
        samples += n
        loss_sum += loss
        end.report_loss(loss)
    ctrl.send(("stats", {
        "worker": i, "device": str(w.device), "compute_s": w.compute_s, "sleep_s": w.sleep_s,
        "updates": updates, "samples": samples, "averages": averages,
        "staleness": dict(staleness), "active_s": time.monotonic() - t0,
        "finished_at": time.monotonic(), "loss_mean": loss_sum / updates if updates else None,
        # by value (numpy pickles its bytes): a torch tensor would travel as a shared-memory
        # handle that this exiting process could no longer serve
        "audit": audit.numpy() if audit is not None else None,
        # tracked state: this worker's final running max, for the audit of u (only this
        # worker's local steps change vhat_i, so it is final now)
        "audit_vhat": state["vhat"].double().numpy().copy()
        if audit is not None and tracked else None,
    }))


def gossip_worker_main(ctrl: Connection, end: ShmGossipEnd, neighbors: list[int],
                       probs: list[float], averages: int, seed: int) -> None:
    """Gossip only (no gradients): ``averages`` pairwise averages with random neighbours."""
    pick = _neighbors_rng(neighbors, probs, seed) if neighbors else None
    ctrl.send(("hello", end.worker))
    if not end.go.wait(GO_TIMEOUT_S):
        raise TimeoutError(f"worker {end.worker}: no start signal within {GO_TIMEOUT_S:g} s")
    for _ in range(averages if pick is not None else 0):
        end.average_with(pick())
        # stands in for the gradient computation between averages; without it a worker
        # would do hundreds of averages with the same neighbours in one time slice
        os.sched_yield()
    ctrl.send(("stats", {"worker": end.worker}))


def gossip_consensus(graph, x0: Tensor, averages_per_worker: int, seed: int = 0,
                     timeout_s: float = 120.0) -> Tensor:
    """Run real gossip processes on ``graph`` from initial rows ``x0`` ([n, d]) with no
    gradient steps; return the final rows. Pairwise averaging is doubly stochastic, so
    the mean of the rows is conserved and the rows converge to it."""
    from ..procs import ProcessGroup
    from ..topology import neighbor_probabilities

    n = x0.shape[0]
    g = ShmGossip(n, x0.shape[1], dtype=x0.dtype)
    g.x.copy_(x0)
    nbp = neighbor_probabilities(graph)
    with ProcessGroup() as group:
        for i in range(n):
            nb, p = nbp[i]
            group.start(f"worker {i}", gossip_worker_main,
                        (g.end(i, timeout_s), nb, p, averages_per_worker, seed * 1000 + i))
        hello, done = set(), set()
        deadline = time.monotonic() + timeout_s
        while len(done) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"gossip did not finish in {timeout_s:g} s; waiting for "
                                   f"workers {sorted(set(range(n)) - done)}")
            for _, msg in group.poll(0.2):
                if msg[0] == "hello":
                    hello.add(msg[1])
                    if len(hello) == n:
                        g.go.set()
                elif msg[0] == "stats":
                    done.add(msg[1]["worker"])
        group.join(10.0)
    return g.x.clone()


__all__ = ["worker_main", "gossip_worker_main", "gossip_consensus", "ShmGossip"]
