"""The contention curve of this machine: how much slower a gradient gets when ``k``
one-thread workers compute at once (``bench contention``, ``[simulate] contention =
"measure"``).

The co-runners (one torch thread each) build the run's model and data once and warm up;
then, for ``rounds`` rounds, for each ``k`` in 1..``max_workers``, the first ``k`` of them
compute gradients of the real model for a window of ``seconds``, starting together at a
time the parent sets. A round's factor for ``k`` is its per-batch time (the median over
the ``k`` workers of each one's mean over the window) over the same round's ``k = 1``;
the curve is the median of the rounds' factors. Alternating the ``k`` inside each round
cancels what drifts over seconds on a shared machine (a virtual machine's core speed
varied by 1.8x from one measurement to the next here; one ``k`` after the other measured
factors of 0.86 to 1.55 for the same 2 workers). On a machine with ``c`` cores,
``k <= c`` measures what sharing memory bandwidth, caches and turbo costs; ``k > c`` adds
time-sharing (``factor ~ k / c``), which
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


def _co_runner(ctrl: Any, cfg: RunConfig, task: Any, data: Any, orders: Any,
               timeout: float) -> None:
    from ..algorithms.common import LocalWorker
    from ..plan import RunPlan

    torch.set_num_threads(1)
    plan = RunPlan.of(cfg, data, task)
    w = LocalWorker.build(cfg, task, data, plan.shards[0], 0, torch.device("cpu"))
    for _ in range(3):
        w.gradient()
    ctrl.send(READY)
    while True:
        order = orders.get(timeout=timeout)
        if order is None:
            return
        start, seconds = order
        time.sleep(max(0.0, start - time.time()))
        # the mean over a window, not a median of batches: a batch preempted by
        # time-sharing must count (past the core count most batches run whole and a few
        # wait a time slice)
        batches, t0 = 0, time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end or batches < 3:
            w.gradient()
            batches += 1
        ctrl.send((TIMES, (time.perf_counter() - t0) / batches))


def measure_contention(cfg: RunConfig, task: Any, data: Any, max_workers: int | None = None,
                       seconds: float = 1.0, timeout: float = 300.0,
                       rounds: int = 3) -> list[dict]:
    """One row per ``k`` co-running workers: ``{"workers": k, "batch_s": seconds per batch
    (the median over the rounds), "factor": the median over the rounds of batch_s over
    that round's at k = 1, "factors": each round's}`` (see the module docstring)."""
    k_max = max_workers or available_cores()
    if k_max < 1 or not 0 < seconds <= 3600 or rounds < 1:
        raise UserError(f"contention: max workers must be >= 1, seconds in (0, 3600] and "
                        f"rounds >= 1, got {k_max}, {seconds} and {rounds}")
    # one worker's compute alone: no slowdown, no network, a shard of all the data
    one = cfg.replace(workers=1, slowdown=[], straggler_prob=0.0,
                      network=NetworkConfig().model_dump())
    batch: dict[int, list[float]] = {k: [] for k in range(1, k_max + 1)}
    orders = [CTX.Queue() for _ in range(k_max)]
    deadline = time.monotonic() + timeout
    with ProcessGroup() as group:

        def replies(n: int, what: str) -> list[Any]:
            got: list[Any] = []
            while len(got) < n:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"contention: the co-running workers did not {what} "
                                       f"within {timeout:.0f} s")
                got += [msg for _, msg in group.poll(0.1)]
            return got

        for r in range(k_max):
            group.start(f"co-runner {r}", _co_runner, (one, task, data, orders[r], timeout),
                        threads=1)
        replies(k_max, "start")
        for _ in range(rounds):
            for k in range(1, k_max + 1):
                start = time.time() + 0.05  # together, as near as the clock allows
                for r in range(k):
                    orders[r].put((start, seconds))
                times = [m[1] for m in replies(k, "finish a window")]
                batch[k].append(statistics.median(times))
        for q in orders:
            q.put(None)
        group.join(timeout)
    rows = []
    for k in range(1, k_max + 1):
        factors = [b / one_ for b, one_ in zip(batch[k], batch[1], strict=True)]
        rows.append({"workers": k, "batch_s": statistics.median(batch[k]),
                     "factor": statistics.median(factors), "factors": factors})
    return rows


def curve(rows: list[dict]) -> list[float]:
    """The factors of :func:`measure_contention`'s rows, as ``[simulate] contention``."""
    return [1.0] + [round(max(1.0, r["factor"]), 4) for r in rows[1:]]


def measured_hardware(hw: Any, cfg: RunConfig, task: Any, data: Any) -> tuple[Any, list[dict]]:
    """``hw`` with its ``contention = "measure"`` replaced by the curve measured now with
    ``task`` on ``data``, and the measurement's rows: up to ``cores_per_node`` co-running
    workers, and no more than this machine's cores (past them a measurement times
    time-sharing, which the simulator models itself, not the node's contention; a node
    with more cores than this machine keeps the last measured factor up to its core count,
    see :mod:`~apam_gossip.sim.hardware`)."""
    cores = available_cores()
    k = min(hw.cores_per_node, cores) if hw.cores_per_node else cores
    rows = measure_contention(cfg, task, data, k)
    return hw.with_curve(curve(rows)), rows


def resolve_hardware(hw: Any, cfg: RunConfig, dataset: Any) -> Any:
    """``hw`` with a ``contention = "measure"`` replaced by the curve measured now with the
    model and data of ``cfg`` (:func:`measured_hardware`); any other ``hw`` as it is."""
    if hw.contention != "measure":
        return hw
    from ..task import make_task

    data = dataset.subset(cfg.data.train_limit, cfg.data.test_limit)
    return measured_hardware(hw, cfg, make_task(cfg, data, check=False), data)[0]


__all__ = ["measure_contention", "measured_hardware", "curve", "resolve_hardware"]
