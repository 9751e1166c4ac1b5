"""Transports move flat tensors and small metadata between processes.

They know nothing of optimizers or models: the centralized algorithm talks to a
:class:`MasterEnd` (one per run) and :class:`WorkerEnd` s (one per worker), whatever
carries the bytes (shared memory on one machine; MPI across machines).

Messages are small tuples; tensors travel separately through the transport's buffers.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor


class PeerGone(RuntimeError):
    """The other end of a connection went away (its process exited or was killed)."""


class MasterEnd(Protocol):
    """The master's side of a star: gradients in from any worker, parameters out."""

    n_workers: int

    def ready(self, timeout: float) -> list[int]:
        """Workers whose message has arrived (waits up to ``timeout`` s for one)."""

    def recv(self, worker: int) -> tuple[Any, Tensor]:
        """Take worker's message; returns (meta, gradient). The tensor is valid until
        the next :meth:`send` to that worker."""

    def send(self, worker: int, params: Tensor | None, meta: Any) -> None:
        """Send ``meta`` (and ``params`` unless None) to ``worker`` only."""


class WorkerEnd(Protocol):
    """A worker's side of a star."""

    worker: int

    def send(self, grad: Tensor | None, meta: Any) -> None:
        """Send ``meta`` (and ``grad`` unless None) to the master."""

    def recv(self, params_out: Tensor, timeout: float) -> Any:
        """Wait for the master's message, copy parameters into ``params_out``; return meta."""
