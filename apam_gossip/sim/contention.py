"""The contention curve of this machine: how much slower a gradient gets when ``k``
one-thread workers compute at once (``bench contention``, ``[simulate] contention =
"measure"``).

For each ``k`` in 1..``max_workers``, ``k`` processes (one torch thread each) build the
run's model and data, warm up, wait for a common start, then compute gradients of the
real model for ``seconds``; the factor is the median of their mean times per batch over the
1-process one. On a machine with ``c`` cores, ``k <= c`` measures what sharing memory
bandwidth, caches and turbo costs; ``k > c`` adds time-sharing (``factor ~ k / c``), which
:class:`~apam_gossip.sim.hardware.Hardware` extrapolates anyway.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ..config import NetworkConfig, RunConfig
from ..errors import UserError
from ..placement import available_cores
from ..procs import CTX, ProcessGroup

READY, TIMES = "ready", "times"


def _co_runner(ctrl: Any, cfg: RunConfig, task: Any, data: Any, go: Any, seconds: float,
               timeout: float) -> None:
    from ..algorithms.common import LocalWorker
    from ..plan import RunPlan

    torch.set_num_threads(1)
    plan = RunPlan.of(cfg, data, task)
    w = LocalWorker.build(cfg, task, data, plan.shards[0], 0, torch.device("cpu"))
    for _ in range(3):
        w.gradient()
    ctrl.send(READY)
    if not go.wait(timeout):
        return
    # the mean over a window, not a median of batches: a batch preempted by time-sharing
    # must count (past the core count most batches run whole and a few wait a time slice)
    batches, t0 = 0, time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end or batches < 3:
        w.gradient()
        batches += 1
    ctrl.send((TIMES, (time.perf_counter() - t0) / batches))


def measure_contention(cfg: RunConfig, task: Any, data: Any, max_workers: int | None = None,
                       seconds: float = 2.0, timeout: float = 300.0) -> list[dict]:
    """One row per ``k`` co-running workers: ``{"workers": k, "batch_s": seconds per batch
    (the median over the workers of each one's mean), "factor": batch_s / batch_s at
    k = 1}``."""
    k_max = max_workers or available_cores()
    if k_max < 1 or not 0 < seconds <= 3600:
        raise UserError(f"contention: max workers must be >= 1 and seconds in (0, 3600], got "
                        f"{k_max} and {seconds}")
    # one worker's compute alone: no slowdown, no network, a shard of all the data
    one = cfg.replace(workers=1, slowdown=[], straggler_prob=0.0,
                      network=NetworkConfig().model_dump())
    rows: list[dict] = []
    for k in range(1, k_max + 1):
        go = CTX.Event()
        times: list[float] = []
        with ProcessGroup() as group:
            for r in range(k):
                group.start(f"co-runner {r}", _co_runner,
                            (one, task, data, go, seconds, timeout), threads=1)
            ready, deadline = 0, time.monotonic() + timeout
            while len(times) < k:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"contention: {k} co-running workers did not finish "
                                       f"in {timeout:.0f} s")
                for _, msg in group.poll(0.1):
                    if msg == READY:
                        ready += 1
                        if ready == k:
                            go.set()
                    elif isinstance(msg, tuple) and msg[0] == TIMES:
                        times.append(msg[1])
            group.join(timeout)
        batch = statistics.median(times)
        rows.append({"workers": k, "batch_s": batch,
                     "factor": batch / rows[0]["batch_s"] if rows else 1.0})
    return rows


def curve(rows: list[dict]) -> list[float]:
    """The factors of :func:`measure_contention`'s rows, as ``[simulate] contention``."""
    return [1.0] + [round(max(1.0, r["factor"]), 4) for r in rows[1:]]


def resolve_hardware(hw: Any, cfg: RunConfig, dataset: Any) -> Any:
    """``hw`` with a ``contention = "measure"`` replaced by the curve measured now, with
    the model and data of ``cfg`` (up to ``cores_per_node`` co-running workers, else this
    machine's cores); any other ``hw`` as it is."""
    if hw.contention != "measure":
        return hw
    from ..task import make_task

    data = dataset.subset(cfg.data.train_limit, cfg.data.test_limit)
    task = make_task(cfg, data, check=False)
    return hw.with_curve(curve(measure_contention(cfg, task, data, hw.cores_per_node or None)))


__all__ = ["measure_contention", "curve", "resolve_hardware"]
