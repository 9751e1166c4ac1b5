"""Child processes that report their errors and are always reaped.

Every child is started with the ``spawn`` method (safe with CUDA and with torch's
thread pools, unlike ``fork``), gets a control pipe to the parent, and asks the kernel to
SIGKILL it if the parent dies (``PR_SET_PDEATHSIG``), so an interrupted run never leaves
orphans behind. An exception in a child is sent up the control pipe and re-raised in the
parent as :class:`ChildFailed` with the child's name and message. :class:`ProcessGroup`
is a context manager whose exit terminates, then kills, whatever is still running.

Control messages must be plain Python/numpy data: a torch tensor sent through a pipe
travels as a shared-memory handle that the sender must stay alive to serve, so a child
that sends one and exits can leave the parent blocked in ``recv``.

Shared tensors use torch's default ``file_descriptor`` strategy: the segment is unlinked
from /dev/shm as soon as it is created, so the kernel frees it when the last process
holding it exits, even after a SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.multiprocessing as tmp

from .messages import ChildError, Died

CTX = tmp.get_context("spawn")


class ChildFailed(RuntimeError):
    """A child process raised an exception or died."""

    def __init__(self, name: str, message: str, details: str = "") -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.details = details


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start children without re-running the caller's ``__main__`` script in them.

    ``spawn`` normally re-imports the main script in every child, so a user script that
    calls :func:`apam_gossip.run` without an ``if __name__ == "__main__":`` guard would
    recurse. Our children only run functions of this package, so they never need the
    main module: hiding its file/spec while a child starts makes spawn skip it.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__")
             if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__dict__["__spec__"] = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""The signals that ask a run to stop in order (SIGUSR1: Slurm's ``--signal=USR1@...``)."""


def _set_parent_death_signal() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:  # not glibc/Linux: the parent's reaping still applies
        pass


def _child_main(name: str, target: Callable[..., None], args: tuple, ctrl: Connection,
                threads: int, parent_pid: int) -> None:
    _set_parent_death_signal()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    # A stop request (SIGTERM for a preemption, Ctrl-C, Slurm's SIGUSR1 warning, any of
    # them sent to the whole process group) is the parent's to act on: it stops the run in
    # order and checkpoints; children are ended by the parent (SIGKILL) or its death.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        target(ctrl, *args)
    except BaseException as e:  # noqa: BLE001 - report everything, then exit non-zero
        try:
            ctrl.send(ChildError(f"{type(e).__name__}: {e}", traceback.format_exc()))
        except (OSError, EOFError, BrokenPipeError):
            pass
        ctrl.close()
        os._exit(1)
    ctrl.close()


class ProcessGroup:
    """Named child processes with control pipes; reaps all of them on exit."""

    def __init__(self, tolerate: Callable[[str], bool] | None = None) -> None:
        """``tolerate(name)``: True for children whose death by a signal (SIGKILL, OOM
        killer, ...) the run survives; :meth:`poll` then reports ``(name, Died(how))``
        instead of raising. An exception a child reports is never tolerated."""
        self.procs: dict[str, Any] = {}
        self.ctrls: dict[str, Connection] = {}
        self.exited: set[str] = set()
        self.tolerate = tolerate or (lambda name: False)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, name: str, target: Callable[..., None], args: tuple, threads: int = 1) -> None:
        """Start ``target(ctrl, *args)`` in a new process called ``name``."""
        parent_end, child_end = CTX.Pipe(duplex=True)
        p = CTX.Process(
            target=_child_main, name=name,
            # not daemonic: a worker may start processes of its own (a DataLoader with
            # num_workers > 0); it is reaped by close() and dies with us (PDEATHSIG)
            args=(name, target, args, child_end, threads, os.getpid()), daemon=False,
        )
        with _main_module_hidden():
            p.start()
        child_end.close()  # so the parent sees EOF when the child goes away
        self.procs[name] = p
        self.ctrls[name] = parent_end

    def send(self, name: str, msg: Any) -> None:
        self.ctrls[name].send(msg)

    def poll(self, timeout: float) -> list[tuple[str, Any]]:
        """Messages that arrived within ``timeout`` s as ``(child, message)`` pairs.

        Raises :class:`ChildFailed` when a child reports an error or dies with a
        non-zero exit code.
        """
        live = {c: n for n, c in self.ctrls.items() if n not in self.exited}
        sentinels = {self.procs[n].sentinel: n for n in self.procs if n not in self.exited}
        if not live and not sentinels:
            time.sleep(min(timeout, 0.05))
            return []
        out: list[tuple[str, Any]] = []
        for obj in wait(list(live) + list(sentinels), timeout):
            if isinstance(obj, Connection):
                name = live[obj]
                try:
                    while obj.poll():
                        msg = obj.recv()
                        if isinstance(msg, ChildError):
                            raise ChildFailed(name, msg.message, msg.details)
                        out.append((name, msg))
                except (EOFError, OSError):
                    out += self._check_exit(name)
            else:
                out += self._check_exit(sentinels[obj])
        return out

    def _check_exit(self, name: str) -> list[tuple[str, Any]]:
        if name in self.exited:
            return []
        p = self.procs[name]
        p.join(timeout=5.0)
        if p.exitcode is None:
            return []  # closed its pipe but still running; its sentinel will tell
        self.exited.add(name)
        if p.exitcode != 0:
            how = f"killed by signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
            if p.exitcode < 0 and self.tolerate(name):
                return [(name, Died(how))]
            raise ChildFailed(name, f"process died ({how})")
        return []

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.is_alive()]

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every child to exit; True if all did."""
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        return not self.alive()

    def close(self, grace: float = 3.0) -> None:
        """Kill every child still running (they ignore SIGTERM); close all pipes."""
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        for c in self.ctrls.values():
            c.close()
        for p in self.procs.values():
            if p.exitcode is not None:
                p.close()
        self.procs.clear()
        self.ctrls.clear()
