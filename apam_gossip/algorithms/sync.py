"""Synchronous baselines, the comparators of the APAM and AD-PSGD papers.

* ``allreduce``: every step each worker computes a gradient on its own batch, the
  gradients are averaged over all workers (all-reduce), and every replica applies the same
  optimizer step (AMSGrad, SGD, ...), so the replicas stay identical; the global batch is
  ``batch_size x workers``. A step lasts as long as the slowest worker's gradient.
* ``dpsgd``: synchronous D-PSGD (Lian et al. 2017): every round each worker computes a
  gradient at its model, the models are mixed with Metropolis-Hastings weights,
  x_i <- sum_j W_ij x_j, and each worker applies its local optimizer step with its gradient.

Both run the same number of samples as the asynchronous modes: ``steps`` rounds of
``workers x batch_size`` samples.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from ..config import RunConfig
from ..core.consensus import consensus
from ..core.sync import allreduce_step
from ..emulation import LinkModel
from ..messages import PROGRESS_EVERY_S, Interrupted, Progress, Snapshot
from ..optim import Optimizer
from ..task import Task
from ..transport import Control, SyncEnd
from .common import LocalWorker


def sync_worker_main(ctrl: Control, end: SyncEnd, cfg: RunConfig, task: Task, data: Any,
                     shard: Tensor, device: str, x0: Tensor, steps: int, eval_at: list[int],
                     snaps: Tensor, mix_weights: list[tuple[int, float]] | None,
                     neighbors: list[int]) -> None:
    """One worker of ``allreduce`` (``mix_weights`` None) or ``dpsgd``. Worker 0 reports
    snapshots of the model (allreduce: the common replica; dpsgd: the mean of all models,
    with the consensus distance) at the step counts in ``eval_at``.

    Buffers (BatchNorm statistics): allreduce averages them with the gradients every
    step, so the replicas stay identical; dpsgd mixes them with the parameters."""
    i = end.worker
    n = end.n_workers
    w = LocalWorker.build(cfg, task, data, shard, i, torch.device(device))
    w.flat.state.copy_(x0)
    n_params = w.flat.n_params
    opt = Optimizer(cfg.optim)
    state = opt.init(w.flat.params)
    # what the transport exchanges, where it keeps it (end.device): the flat buffers
    # themselves when that is the worker's own device (shared memory: its GPU's slots)
    here = end.device == w.device
    x_t = w.flat.state if here else torch.zeros(w.flat.numel, device=end.device)
    g_t = w.flat.grad_msg if here else torch.zeros(w.flat.numel, device=end.device)
    link = LinkModel(cfg.network, 4 * w.flat.numel)
    comm_s = (link.allreduce_seconds(n) if mix_weights is None
              else max((link.seconds(i, j) for j in neighbors), default=0.0))
    points = {p: k for k, p in enumerate(eval_at)}
    loss_sum, loss_n, slot = 0.0, 0, 0
    samples = 0
    end.barrier()  # everyone has data and model: the clock starts
    t0 = time.monotonic()
    last_progress = t0

    def snapshot(k: int, xbar: Tensor, extra: dict, final: bool = False) -> None:
        nonlocal loss_sum, loss_n, slot
        snaps[slot].copy_(xbar)
        ctrl.send(Snapshot(slot, time.monotonic() - t0, k * n * cfg.data.batch_size, k,
                           loss_sum / loss_n if loss_n else None, final, extra))
        slot += 1
        loss_sum, loss_n = 0.0, 0

    def on_all(k: int, final: bool):
        def see(slots: Tensor) -> None:
            xbar, extra = consensus(slots, n_params)
            snapshot(k, xbar, extra, final)
        return see

    if i == 0 and 0 in points and mix_weights is None:
        snapshot(0, w.flat.state.detach().cpu(), {})
    stopped_at = None  # the last step taken, when the workers agreed to stop early
    for k in range(1, steps + 1):
        # a stop request (SIGTERM under mpirun) must stop every worker at the same step,
        # or one would wait forever for the others' next exchange: the vote runs beside
        # this step's gradient
        vote = end.vote_stop(ctrl.poll())
        loss, nb, _ = w.gradient()
        if vote.agreed():
            stopped_at = k - 1
            break
        samples += nb
        msg = w.flat.pack_grad_msg()  # [grads | buffers after this forward pass]
        if g_t is not msg:
            g_t.copy_(msg)
        link.sleep(comm_s)
        if mix_weights is None:
            end.allreduce_mean(g_t)
            if g_t is not msg:
                msg.copy_(g_t)
            allreduce_step(opt, w.flat.params, w.flat.buffers, msg, state, opt.lr_at(k, steps))
        else:
            if x_t is not w.flat.state:
                x_t.copy_(w.flat.state)
            want = (k - 1) in points  # every worker knows: a transport may need all to join
            see = on_all(k - 1, False) if i == 0 and want else None
            end.mix(x_t, mix_weights, on_all=see, gather=want)
            if x_t is not w.flat.state:
                w.flat.state.copy_(x_t)
            opt.update(w.flat.params, w.flat.grads, state, lr=opt.lr_at(k, steps))
        loss_sum += loss
        loss_n += 1
        if i == 0:
            if mix_weights is None and k in points and k < steps:
                snapshot(k, w.flat.state.detach().cpu(), {})
            now = time.monotonic()
            if now - last_progress > PROGRESS_EVERY_S:
                ctrl.send(Progress(k * n * cfg.data.batch_size, k))
                last_progress = now
    wall = time.monotonic() - t0
    if stopped_at is not None:  # no result: say so, and what this worker did
        ctrl.send(Interrupted(None, stopped_at))
        ctrl.send(w.report(updates=stopped_at, samples=samples, wall_time=wall))
        return
    if mix_weights is None:
        if i == 0:
            snapshot(steps, w.flat.state.detach().cpu(), {}, final=True)
    else:  # one last exchange so worker 0 sees every final model
        if x_t is not w.flat.state:
            x_t.copy_(w.flat.state)
        end.mix(x_t, [(i, 1.0)], on_all=on_all(steps, True) if i == 0 else None, gather=True)
    ctrl.send(w.report(updates=steps, samples=samples, wall_time=wall))
