"""The event engine: a heap of ``(time, seq, callback)`` on a virtual clock.

``seq`` breaks ties in scheduling order, so a simulation is deterministic."""

from __future__ import annotations

import heapq
from collections.abc import Callable


class Engine:
    """``at(t, fn)`` schedules ``fn()`` at virtual time ``t``; :meth:`run` processes events
    in time order until none is left or :meth:`stop` is called."""

    def __init__(self) -> None:
        self.now = 0.0
        self.events = 0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._stopped = False

    def at(self, t: float, fn: Callable[[], None]) -> None:
        assert t >= self.now - 1e-12, (t, self.now)  # no event in the past
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn))

    def after(self, dt: float, fn: Callable[[], None]) -> None:
        self.at(self.now + dt, fn)

    def stop(self) -> None:
        self._stopped = True

    def run(self) -> None:
        heap = self._heap
        while heap and not self._stopped:
            t, _, fn = heapq.heappop(heap)
            self.now = t
            self.events += 1
            fn()


class Resource:
    """A FIFO server (a NIC, the master's update loop): :meth:`serve` returns when a job
    of ``duration`` that arrives at ``t`` is done, after the jobs queued before it. Jobs
    are queued in call order, so call it at the job's arrival (the engine's ``now``):
    a reservation for the future would hold up jobs that arrive before it."""

    def __init__(self) -> None:
        self.free_at = 0.0
        self.busy_s = 0.0

    def serve(self, t: float, duration: float) -> float:
        start = max(t, self.free_at)
        self.free_at = start + duration
        self.busy_s += duration
        return self.free_at

    def busy_until(self, t: float) -> float:
        """Seconds of service done by time ``t`` (work queued past ``t`` not counted)."""
        return self.busy_s - max(0.0, self.free_at - t)
