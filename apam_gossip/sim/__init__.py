"""A discrete-event simulator of the real algorithms, for clusters we do not have.

Every mode runs on a virtual clock driven by a cluster model (:mod:`.cluster`): each
worker's gradient time, each link's latency and bandwidth, a node's NIC shared by its
transfers, the master's NIC and its update cost. In *math mode* (the default) the real
model, data, optimizer and evaluator run in event order in this one process: a gradient
is computed on exactly the parameters its worker had when it started (stale by the
simulated delay), an average happens when its simulated transfer completes. So accuracy
against (virtual) time, staleness and consensus are predicted, not only throughput. A seed
makes a simulation bit-reproducible. *Timing-only* mode skips the math.

The event engine is a plain heap (:mod:`.engine`), not simpy: a simulated worker here is a
few lines of state, and a heap of ``(time, seq, callback)`` runs ~10x more events per second
than simpy's generator processes, which the 10^6-event timing runs need.
"""

from .run import simulate

__all__ = ["simulate"]
