"""Emulated heterogeneity: slow links (latency + bandwidth) as sleeps.

Compute heterogeneity (fixed ``slowdown`` factors and random stragglers) lives in
:class:`apam_gossip.algorithms.common.LocalWorker`; this module models the network. The
algorithms call it at the same points whatever the transport, so a cluster profile means
the same thing on shared memory and over MPI.
"""

from __future__ import annotations

import time

from .config import NetworkConfig

MASTER = -1


class LinkModel:
    """Seconds to move ``nbytes`` between two workers (``-1`` = the master; the simulator's
    shard ``k`` of a sharded master is ``-1 - k``, on links and a NIC like the master's)."""

    def __init__(self, net: NetworkConfig, nbytes: int) -> None:
        self.net = net
        self.nbytes = nbytes
        self.active = net.active
        self.overrides = {}
        for i, j, lat, bw in net.links:
            key = (min(int(i), int(j)), max(int(i), int(j)))
            self.overrides[key] = (lat, bw)

    def _nic(self, i: int) -> tuple[float, float]:
        if i <= MASTER:  # the master, or a sharded master's shard k (-1 - k): each its own
            return self.net.master_latency_ms, self.net.master_bandwidth_gbps
        lat = self.net.worker_latency_ms[i] if 0 <= i < len(self.net.worker_latency_ms) else 0.0
        bw = self.net.worker_bandwidth_gbps[i] \
            if 0 <= i < len(self.net.worker_bandwidth_gbps) else 0.0
        return lat, bw

    def nic_gbps(self, i: int) -> float:
        """The rate of node ``i``'s NIC (Gbit/s, 0 = unlimited): its own cap, else the
        network's ``bandwidth_gbps`` (every NIC runs at link speed)."""
        if not self.active:
            return 0.0
        own = self._nic(i)[1]
        return own if own > 0 else self.net.bandwidth_gbps

    def parts(self, i: int, j: int) -> tuple[float, float]:
        """(latency in seconds, bandwidth in Gbit/s, 0 = unlimited) of the link i-j."""
        if not self.active:
            return 0.0, 0.0
        i, j = max(i, MASTER), max(j, MASTER)  # a master shard's links are the master's
        key = (min(i, j), max(i, j))
        if key in self.overrides:
            lat_ms, bw = self.overrides[key]
        else:
            (li, bi), (lj, bj) = self._nic(i), self._nic(j)
            lat_ms = self.net.latency_ms + max(li, lj)
            caps = [b for b in (self.net.bandwidth_gbps, bi, bj) if b > 0]
            bw = min(caps) if caps else 0.0
        return lat_ms / 1e3, bw

    def seconds(self, i: int, j: int, nbytes: int | None = None) -> float:
        if not self.active:
            return 0.0
        nbytes = self.nbytes if nbytes is None else nbytes
        lat, bw = self.parts(i, j)
        return lat + (nbytes * 8 / (bw * 1e9) if bw > 0 else 0.0)

    def allreduce_seconds(self, n: int) -> float:
        """A ring all-reduce: 2(n-1) steps, each moving nbytes/n over the slowest link."""
        if not self.active or n < 2:
            return 0.0
        worst = max(self.seconds(i, (i + 1) % n, self.nbytes // n) for i in range(n))
        return 2 * (n - 1) * worst

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)
