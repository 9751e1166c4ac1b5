"""Transports move flat tensors and small metadata between processes.

They know nothing of optimizers or models. Each algorithm talks to the ends below, and
whatever carries the bytes implements them: :mod:`.shm` (shared memory, one machine) and
:mod:`.mpi` (across machines). The algorithm code is the same on both.

* star (centralized): one :class:`MasterEnd`, a :class:`WorkerEnd` per worker (a sharded
  master: one star per shard, a :class:`ShardLink` between the shards, and
  :mod:`.sharded`'s end for each worker);
* gossip (decentralized): a :class:`GossipEnd` per worker;
* sync (the synchronous baselines): a :class:`SyncEnd` per worker;
* every process also has a :class:`Control` end towards the coordinator (a pipe on one
  machine, an in-process outbox under MPI) for the messages of :mod:`apam_gossip.messages`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor


class PeerGone(RuntimeError):
    """The other end of a connection went away (its process exited or was killed)."""


class Control(Protocol):
    """A process's line to the coordinator."""

    def send(self, msg: Any) -> None: ...

    def poll(self) -> bool:
        """True when the coordinator has sent something (a stop request)."""

    def recv(self) -> Any: ...


class MasterEnd(Protocol):
    """The master's side of a star: gradients in from any worker, parameters out."""

    n_workers: int

    def ready(self, timeout: float) -> list[int]:
        """Workers whose message has arrived and was not taken yet (waits up to
        ``timeout`` s for one). Level-triggered: a worker stays listed until
        :meth:`recv` takes its message."""

    def recv(self, worker: int) -> tuple[Any, Tensor]:
        """Take worker's message; returns (meta, gradient). The tensor is valid until
        the next :meth:`send` to that worker. Raises :class:`PeerGone` if it died."""

    def send(self, worker: int, params: Tensor | None, meta: Any) -> None:
        """Send ``meta`` (and ``params`` unless None) to ``worker`` only."""


class WorkerEnd(Protocol):
    """A worker's side of a star."""

    worker: int

    def send(self, grad: Tensor | None, meta: Any) -> None:
        """Send ``meta`` (and ``grad`` unless None) to the master."""

    def recv(self, params_out: Tensor, timeout: float) -> Any:
        """Wait for the master's message, copy parameters into ``params_out``; return meta."""


class ShardLink(Protocol):
    """The line between a sharded master's leader (shard 0) and its followers, beside
    the workers' star: small control messages, and the parts of a checkpoint."""

    def send(self, msg: Any) -> None:
        """The leader: to every follower; a follower: to the leader."""

    def poll(self) -> list[tuple[int, Any]]:
        """``(shard, message)`` pairs that have arrived (never waits)."""

    def payload(self, path: str) -> Any:
        """A follower: what carries its saved part at ``path`` to the leader."""

    def part_path(self, payload: Any, path: str) -> str:
        """The leader: a follower's part as a file here (``path`` if it must be written)."""


class GossipEnd(Protocol):
    """A gossip worker's view of every worker's model (AD-PSGD).

    Every write to the worker's model (and tracked second moment ``u``) happens inside
    one of the atomic operations below, so no local step is lost to an average."""

    worker: int
    n_workers: int
    device: torch.device  # where x_i lives: the local step runs there

    def wait_start(self, timeout: float) -> bool:
        """Wait until every worker is ready to train; False on timeout."""

    def claim(self, total: int) -> int:
        """Claim one of the ``total`` updates of the run: its index 1..total, or 0 when
        none is left (or a stop was requested)."""

    def snapshot(self, out: Tensor) -> int:
        """Copy this worker's model into ``out``; returns its version."""

    def average_with(self, j: int) -> bool:
        """Atomically set x_i, x_j (and u_i, u_j) to their mean; False when ``j``
        refused (it was averaging with another worker) and nothing changed."""

    def update_local(self, fn: Callable[[Tensor, Tensor | None], None],
                     since: int | None = None) -> int:
        """Apply ``fn(x_i, u_i)`` atomically (a local step), count it; returns the new
        version. ``since`` (the snapshot's version plus this worker's own averages since):
        the transport may record the step's staleness, ``version before the step -
        since``, with it (a checkpoint then carries the histogram)."""

    def report_loss(self, loss: float) -> None: ...

    def is_alive(self, j: int) -> bool:
        """False once worker ``j``'s process is known dead (never choose it again)."""

    def optimizer_state(self) -> dict[str, Tensor] | None:
        """This worker's optimizer state where the transport keeps it (so a checkpoint
        can copy it consistently), or None to keep it privately."""


class SyncEnd(Protocol):
    """A worker's side of the synchronous collectives (every worker calls each)."""

    worker: int
    n_workers: int
    device: torch.device  # where the tensors it exchanges must be

    def barrier(self) -> None: ...

    def allreduce_mean(self, t: Tensor) -> None:
        """``t`` <- the mean of every worker's ``t`` (in place)."""

    def mix(self, x: Tensor, weights: list[tuple[int, float]],
            on_all: Callable[[Tensor], None] | None = None, gather: bool = False) -> None:
        """``x`` <- sum_j w_j x_j over (worker, weight) pairs, self included;
        ``on_all(models)`` sees every worker's model before the mix when ``gather``."""

    def vote_stop(self, mine: bool) -> StopVote:
        """Collective, once per step: put this worker's wish to stop to the vote (a stop
        request reached it). The vote runs beside the step's gradient; its
        :meth:`StopVote.agreed` is the same on every worker, so all stop at one step (a
        transport whose coordinator ends the workers itself may answer False always)."""


class StopVote(Protocol):
    def agreed(self) -> bool:
        """True on every worker when any worker voted to stop (waits for the vote)."""


class NoVote:
    """A transport's vote when its coordinator stops the workers itself: never agreed."""

    def agreed(self) -> bool:
        return False
