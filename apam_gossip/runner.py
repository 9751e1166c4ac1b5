"""``run(config) -> RunResult``: the single entry point that drives every mode.

The calling process is the coordinator: it loads the data once (into shared memory, so
workers do not each hold a copy), starts the processes of the chosen mode, evaluates the
snapshots they report while they keep training, and always reaps them, also on errors,
Ctrl-C and timeouts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .algorithms import apam
from .algorithms.common import (
    LocalWorker,
    device_for,
    eval_points,
    initial_model,
    threads_per_worker,
    total_updates,
)
from .config import ConfigError, RunConfig
from .data import Dataset, load_dataset, partition
from .evaluate import Evaluator
from .procs import ChildFailed, ProcessGroup
from .result import EvalRecord, RunResult, WorkerStats
from .transport.shm import ShmStar


class RunTimeout(RuntimeError):
    """The run exceeded ``config.timeout_s``."""


@dataclass
class Event:
    """Progress notifications for a UI: ``kind`` is "start", "progress" or "eval"."""

    kind: str
    samples: int = 0
    total_samples: int = 0
    record: EvalRecord | None = None


Callback = Callable[[Event], None]


def run(config: RunConfig, *, dataset: Dataset | None = None,
        callback: Callback | None = None) -> RunResult:
    """Train as ``config`` says and return the :class:`RunResult`.

    ``dataset`` skips loading (tests, repeated runs); ``callback`` receives
    :class:`Event` s for progress display.
    """
    config.validate()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was requested but torch.cuda.is_available() is False; "
                          "use --device auto or cpu")
    if dataset is None:
        dataset = load_dataset(config.data.dataset, config.data.data_dir)
    dataset = dataset.subset(config.data.train_limit, config.data.test_limit)
    if config.workers > len(dataset.y_train):
        raise ConfigError(f"workers ({config.workers}) exceeds the {len(dataset.y_train)} "
                          "training samples")
    cb = callback or (lambda e: None)
    old_threads = torch.get_num_threads()
    try:
        if config.mode == "sequential":
            return _run_sequential(config, dataset, cb)
        if config.mode == "centralized":
            return _run_centralized(config, dataset, cb)
        raise ConfigError(f"mode {config.mode!r} is not available yet")
    finally:
        torch.set_num_threads(old_threads)


def _eval_device(cfg: RunConfig) -> torch.device:
    return torch.device("cuda", 0) if cfg.device != "cpu" and torch.cuda.is_available() \
        else torch.device("cpu")


def _run_sequential(cfg: RunConfig, dataset: Dataset, cb: Callback) -> RunResult:
    """Plain sequential training with the same optimizer, data and seed (the reference).

    Evaluation pauses the clock, so ``wall_time`` is training time only.
    """
    torch.set_num_threads(threads_per_worker(cfg, 1))
    x0 = initial_model(cfg, dataset)
    (shard,) = partition(dataset.y_train, 1, cfg.data.partition, cfg.data.dirichlet_alpha,
                         cfg.seed)
    w = LocalWorker.build(cfg, dataset, shard, 0, device_for(cfg, 0))
    w.flat.params.copy_(x0)
    opt = cfg.optim.build()
    state = opt.init(w.flat.params)
    evaluator = Evaluator(cfg.model, dataset, _eval_device(cfg))
    total = total_updates(cfg, len(dataset.y_train))
    points = set(eval_points(total, cfg.evals))
    evals: list[EvalRecord] = []
    train_time, samples, loss_sum, loss_n = 0.0, 0, 0.0, 0
    cb(Event("start", 0, total * cfg.data.batch_size))
    last_progress = time.monotonic()

    def evaluate(k: int) -> None:
        nonlocal loss_sum, loss_n
        loss, acc = evaluator(w.flat.params)
        rec = EvalRecord(train_time, samples, k, loss_sum / loss_n if loss_n else None, loss, acc)
        evals.append(rec)
        loss_sum, loss_n = 0.0, 0
        cb(Event("eval", samples, total * cfg.data.batch_size, rec))

    evaluate(0)
    for k in range(1, total + 1):
        t = time.perf_counter()
        loss, n, _ = w.gradient()
        opt.update(w.flat.params, w.flat.grads, state)
        train_time += time.perf_counter() - t
        samples += n
        loss_sum += loss
        loss_n += 1
        if k in points:
            evaluate(k)
        elif time.monotonic() - last_progress > 0.25:
            cb(Event("progress", samples, total * cfg.data.batch_size))
            last_progress = time.monotonic()
    stats = WorkerStats(0, str(w.device), w.slowdown, total, samples,
                        samples / train_time if train_time else 0.0, w.compute_s, w.sleep_s)
    return RunResult(
        config=cfg.to_dict(), mode="sequential", transport="none", n_params=w.flat.numel,
        wall_time=train_time, updates=total, samples=samples, evals=evals, staleness={0: total},
        workers=[stats], final_params=w.flat.params.detach().cpu().clone(),
    )


def _run_centralized(cfg: RunConfig, dataset: Dataset, cb: Callback) -> RunResult:
    """APAM over the shared-memory transport: a master process and N worker processes."""
    torch.set_num_threads(1)  # the coordinator only evaluates; leave the cores to workers
    x0 = initial_model(cfg, dataset)
    numel = x0.numel()
    shards = partition(dataset.y_train, cfg.workers, cfg.data.partition,
                       cfg.data.dirichlet_alpha, cfg.seed)
    dataset.share_memory_()
    total = total_updates(cfg, len(dataset.y_train))
    total_samples = total * cfg.data.batch_size
    eval_at = eval_points(total, cfg.evals)
    snaps = torch.zeros(len(eval_at) + 1, numel).share_memory_()
    evaluator = Evaluator(cfg.model, dataset, _eval_device(cfg))
    star = ShmStar(cfg.workers, numel)
    tpw = threads_per_worker(cfg, cfg.workers)
    devices = [str(device_for(cfg, i)) for i in range(cfg.workers)]

    evals: list[EvalRecord] = []
    worker_stats: dict[int, dict[str, Any]] = {}
    summary: dict[str, Any] | None = None
    final_params = None
    with ProcessGroup() as group:
        group.start("master", apam.master_main,
                    (star.master_end(), x0, cfg.optim, total, eval_at, snaps), threads=1)
        for i in range(cfg.workers):
            group.start(f"worker {i}", apam.worker_main,
                        (star.worker_end(i), cfg, dataset, shards[i], devices[i]), threads=tpw)
        star.close_parent_copies()
        cb(Event("start", 0, total_samples))
        deadline = time.monotonic() + cfg.timeout_s
        while summary is None or len(worker_stats) < cfg.workers:
            if time.monotonic() > deadline:
                raise RunTimeout(f"run exceeded timeout_s={cfg.timeout_s:g} s; still running: "
                                 f"{', '.join(group.alive()) or 'none'}")
            for name, msg in group.poll(0.5):
                kind = msg[0]
                if kind == "snap":
                    _, j, wall, samples, updates, train_loss, final = msg
                    loss, acc = evaluator(snaps[j])
                    rec = EvalRecord(wall, samples, updates, train_loss, loss, acc)
                    if final:
                        final_params = snaps[j].clone()
                        if evals and evals[-1].updates == updates:
                            continue  # the last eval point already scored this model
                    evals.append(rec)
                    cb(Event("eval", samples, total_samples, rec))
                elif kind == "progress":
                    cb(Event("progress", msg[1], total_samples))
                elif kind == "done":
                    summary = msg[1]
                elif kind == "stats":
                    worker_stats[msg[1]["worker"]] = msg[1]
                else:
                    raise AssertionError(f"unexpected message from {name}: {msg!r}")
        if not group.join(30.0):
            raise ChildFailed(", ".join(group.alive()), "did not exit after the run finished")

    wall = summary["wall_time"]
    workers = [
        WorkerStats(
            worker=i, device=devices[i], slowdown=cfg.slowdown_of(i),
            updates=summary["updates_of"][i], samples=summary["samples_of"][i],
            samples_per_s=summary["samples_of"][i] / wall if wall else 0.0,
            compute_s=worker_stats[i]["compute_s"], sleep_s=worker_stats[i]["sleep_s"],
        )
        for i in range(cfg.workers)
    ]
    return RunResult(
        config=cfg.to_dict(), mode="centralized", transport="shm", n_params=numel,
        wall_time=wall, updates=summary["updates"], samples=summary["samples"], evals=evals,
        staleness={int(k): v for k, v in summary["staleness"].items()}, workers=workers,
        final_params=final_params,
    )
