"""The sequential reference: one process, the same optimizer, data and seed as the
parallel modes (a 1-worker asynchronous run sees exactly its batches)."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..algorithms.common import LocalWorker
from ..config import RunConfig
from ..coordinator import UNSAVED_LOCKSTEP, RunInterrupted, SignalStop
from ..evaluate import Evaluator
from ..messages import PROGRESS_EVERY_S
from ..optim import Optimizer
from ..placement import device_for, eval_device, threads_per_worker
from ..plan import RunPlan
from ..reporting import Callback, Event
from ..result import EvalRecord, RunResult, WorkerStats
from ..task import Task


def run_sequential(cfg: RunConfig, task: Task, data: Any, cb: Callback) -> RunResult:
    """Plain sequential training; evaluation pauses the clock, so ``wall_time`` is
    training time only."""
    torch.set_num_threads(threads_per_worker(cfg, 1))
    plan = RunPlan.of(cfg, data, task, n_shards=1)
    w = LocalWorker.build(cfg, task, data, plan.shards[0], 0, device_for(cfg, 0))
    w.flat.state.copy_(plan.x0)
    opt = Optimizer(cfg.optim)
    state = opt.init(w.flat.params)
    evaluator = Evaluator(task, data, eval_device(cfg), during=cfg.eval_samples)
    total, total_samples = plan.total, plan.total_samples
    points = set(plan.eval_at)
    evals: list[EvalRecord] = []
    train_time, samples, loss_sum, loss_n = 0.0, 0, 0.0, 0
    cb(Event("start", 0, total_samples))
    last_progress = time.monotonic()

    def evaluate(k: int) -> None:
        nonlocal loss_sum, loss_n
        loss, acc = evaluator(w.flat.state)
        rec = EvalRecord(train_time, samples, k, loss_sum / loss_n if loss_n else None, loss, acc)
        evals.append(rec)
        loss_sum, loss_n = 0.0, 0
        cb(Event("eval", samples, total_samples, rec))

    evaluate(0)
    with SignalStop() as stop:  # a stop request ends the run after the current step
        for k in range(1, total + 1):
            if stop.flag:
                raise RunInterrupted(None, k - 1, UNSAVED_LOCKSTEP)
            t = time.perf_counter()
            loss, n, _ = w.gradient()
            opt.update(w.flat.params, w.flat.grads, state, lr=opt.lr_at(k, total))
            train_time += time.perf_counter() - t
            samples += n
            loss_sum += loss
            loss_n += 1
            if k in points:
                evaluate(k)
            elif time.monotonic() - last_progress > PROGRESS_EVERY_S:
                cb(Event("progress", samples, total_samples))
                last_progress = time.monotonic()
    stats = WorkerStats.of(0, str(w.device), w.slowdown, total, samples, train_time,
                           w.compute_s, w.sleep_s)
    return RunResult.of(cfg.to_dict(), "sequential", "none", w.flat.n_params, train_time,
                        total, evals, {0: total}, [stats], w.flat.state.detach().cpu().clone())
