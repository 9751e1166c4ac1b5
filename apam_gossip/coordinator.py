"""The one coordinator loop of every multi-process mode on one machine.

The calling process starts the children of a mode (:class:`Mode.start`), then
:class:`Coordinator` polls their control pipes and hands each typed message
(:mod:`apam_gossip.messages`) to the mode; between polls the mode may act on time
(:meth:`Mode.tick`: evaluation points, checkpoints). The coordinator owns what every
mode needs the same way: the run's deadline, SIGTERM/SIGINT/SIGUSR1 (asking the mode to stop in
order, once; a second signal aborts), joining the children at the end and reporting
a child that failed or would not exit. A mode is only: how its children start, what its
messages mean, when it is finished and what result it builds.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .messages import Interrupted
from .procs import STOP_SIGNALS, ChildFailed


class RunTimeout(RuntimeError):
    """The run exceeded ``config.timeout_s``."""


NO_CHECKPOINT = "no --checkpoint was given, so nothing was saved"
UNSAVED_LOCKSTEP = "this mode writes no checkpoints, so nothing was saved"
UNSAVED_GOSSIP_MPI = ("decentralized mode writes checkpoints on one machine only, so "
                      "nothing was saved")


class RunInterrupted(RuntimeError):
    """A stop request (SIGTERM, SIGINT, SIGUSR1) stopped the run; ``checkpoint`` is where
    it was saved, or None (``unsaved`` says why: one of the ``NO_CHECKPOINT``,
    ``UNSAVED_*`` lines)."""

    def __init__(self, checkpoint: str | None, updates: int,
                 unsaved: str = NO_CHECKPOINT) -> None:
        where = (f"checkpoint written to {checkpoint}; continue with --resume {checkpoint}"
                 if checkpoint else unsaved)
        super().__init__(f"run interrupted after {updates} updates; {where}")
        self.checkpoint = checkpoint
        self.peers: list[int] = []  # under mpirun: the other ranks on this host (rank 0)


class Group(Protocol):
    """What the coordinator needs of a process group (see :class:`~apam_gossip.procs.
    ProcessGroup`; tests drive the coordinator with a fake one)."""

    def poll(self, timeout: float) -> list[tuple[str, Any]]: ...

    def alive(self) -> list[str]: ...

    def join(self, timeout: float) -> bool: ...


class Mode(Protocol):
    """A mode's part of the loop."""

    poll_s: float  # how long one poll may wait (the mode's reaction time)
    interrupted: Interrupted | None  # set when the run stopped early on request

    def handle(self, name: str, msg: Any) -> None:
        """Act on one message from child ``name``."""

    def tick(self) -> None:
        """Called after every poll (time-driven work)."""

    def finished(self) -> bool: ...

    def finish(self) -> None:
        """Called once :meth:`finished`, before the children are joined (the last
        evaluation, the last checkpoint)."""

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: checkpoint if configured and stop soon, then set
        :attr:`interrupted` and report :meth:`finished`."""


class SignalStop:
    """While active (a context manager; only the main thread can install handlers), a
    stop request, SIGTERM, SIGINT or SIGUSR1 (Slurm's ``--signal=USR1@...`` warning),
    sets :attr:`flag` and calls ``on_stop`` (once; also when it is set after the
    request came) instead of killing the process; a second one raises KeyboardInterrupt
    at once. A request kept by :func:`hold_stop_signals` before this one was active
    counts as made on entry."""

    pending: int | None = None  # a request held by hold_stop_signals, not acted on yet

    def __init__(self, on_stop: Callable[[], None] | None = None) -> None:
        self.flag = False
        self.signum: int | None = None
        self._on_stop = on_stop
        self._old: dict[int, Any] = {}

    @property
    def on_stop(self) -> Callable[[], None] | None:
        return self._on_stop

    @on_stop.setter
    def on_stop(self, fn: Callable[[], None] | None) -> None:
        self._on_stop = fn
        if self.flag and fn is not None:  # the request came while nothing could act on it
            fn()

    def _handler(self, signum, frame) -> None:
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        self.signum = signum
        if self._on_stop is not None:
            self._on_stop()

    def __enter__(self) -> SignalStop:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)
            if SignalStop.pending is not None:
                signum, SignalStop.pending = SignalStop.pending, None
                self._handler(signum, None)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def hold_stop_signals() -> Iterator[None]:
    """While active (the ``train`` command runs inside it): a stop request outside a
    run's own :class:`SignalStop` (while the data loads, the workers start, the result
    is written) is held instead of killing the process half-way: a run that starts
    afterwards stops at once, in order; one that has finished completes. A second
    request raises KeyboardInterrupt."""

    def held(signum, frame) -> None:
        if SignalStop.pending is not None:
            raise KeyboardInterrupt
        SignalStop.pending = signum

    old: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        old = {sig: signal.signal(sig, held) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        SignalStop.pending = None


class Coordinator:
    """Runs ``mode`` over ``group`` until it is finished, then joins the children."""

    JOIN_TIMEOUT_S = 30.0
    JOIN_AFTER_STOP_S = 10.0

    def __init__(self, group: Group, mode: Mode, timeout_s: float) -> None:
        self.group, self.mode, self.timeout_s = group, mode, timeout_s

    def run(self) -> None:
        """Raises :class:`RunTimeout` past the deadline, :class:`RunInterrupted` after an
        orderly stop, :class:`~apam_gossip.procs.ChildFailed` for a failed child."""
        deadline = time.monotonic() + self.timeout_s
        stop_sent = False
        with SignalStop() as stop:
            while not self.mode.finished():
                if stop.flag and not stop_sent:
                    self.mode.request_stop()
                    stop_sent = True
                if time.monotonic() > deadline:
                    raise RunTimeout(f"run exceeded timeout_s={self.timeout_s:g} s; still "
                                     f"running: {', '.join(self.group.alive()) or 'none'}")
                for name, msg in self.group.poll(self.mode.poll_s):
                    self.mode.handle(name, msg)
                self.mode.tick()
            self.mode.finish()
        stopped = self.mode.interrupted
        if stopped is not None:
            self.group.join(self.JOIN_AFTER_STOP_S)
            raise RunInterrupted(stopped.checkpoint, stopped.updates)
        if not self.group.join(self.JOIN_TIMEOUT_S):
            raise ChildFailed(", ".join(self.group.alive()),
                              "did not exit after the run finished")
