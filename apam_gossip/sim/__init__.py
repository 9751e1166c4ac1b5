"""A discrete-event simulator of the real algorithms, for clusters we do not have.

Every mode runs on a virtual clock driven by a cluster model (:mod:`.cluster`): each
worker's gradient time, each link's latency and bandwidth, a node's NIC shared by its
transfers, the master's NIC and its update cost. In *math mode* (the default) the real
model, data, optimizer and evaluator run in event order in this one process: a gradient
is computed on exactly the parameters its worker had when it started (stale by the
simulated delay), an average happens when its simulated transfer completes. So accuracy
against (virtual) time, staleness and consensus are predicted, not only throughput. A seed
makes a simulation bit-reproducible. *Timing-only* mode skips the math.

The event engine is a plain heap of ``(time, seq, callback)`` (:mod:`.engine`), not simpy:
every mode here is a handful of callbacks on shared state, which needs none of simpy's
processes, interrupts or containers; ``seq`` makes ties deterministic; and it is one
dependency fewer. Speed is not the reason: on the same workload (10^6 events, 1,024
workers) it runs 1.06 s against simpy's 1.23 s (BENCHMARKS.md, "The simulator").
"""

from typing import Any

__all__ = ["simulate"]


def __getattr__(name: str) -> Any:
    # lazily: the CLI and the profiles read .hardware without importing torch
    if name == "simulate":
        from .run import simulate

        return simulate
    raise AttributeError(name)
