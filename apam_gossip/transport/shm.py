"""Single-machine transport: shared-memory tensor slots plus pipes for notifications.

Star (master/worker): each worker ``i`` owns a parameter slot and a gradient slot in
shared memory and one duplex pipe to the master. A worker writes its gradient into its
slot and then sends a small message; the master applies it and writes fresh parameters
into that worker's parameter slot before answering. Because each slot has exactly one
writer at a time (handed over by the pipe message), no locks are needed and a slow
worker never blocks the others: the master waits on all pipes at once and serves
whichever is ready.
"""

from __future__ import annotations

from multiprocessing.connection import Connection, wait
from typing import Any

import torch
from torch import Tensor

from ..procs import CTX


class PeerGone(RuntimeError):
    """The other end of a pipe closed (its process exited or died)."""


class ShmStar:
    """Creates the shared slots and pipes; hand :meth:`master_end` / :meth:`worker_end`
    to the processes, then call :meth:`close_parent_copies`."""

    def __init__(self, n_workers: int, numel: int, dtype: torch.dtype = torch.float32) -> None:
        self.n_workers = n_workers
        self.params = torch.zeros(n_workers, numel, dtype=dtype).share_memory_()
        self.grads = torch.zeros(n_workers, numel, dtype=dtype).share_memory_()
        pipes = [CTX.Pipe(duplex=True) for _ in range(n_workers)]
        self._master_conns = [a for a, _ in pipes]
        self._worker_conns = [b for _, b in pipes]

    def master_end(self) -> ShmMasterEnd:
        return ShmMasterEnd(self.params, self.grads, self._master_conns)

    def worker_end(self, i: int) -> ShmWorkerEnd:
        return ShmWorkerEnd(i, self.params[i], self.grads[i], self._worker_conns[i])

    def close_parent_copies(self) -> None:
        """Close the parent's pipe ends so each side sees EOF when its peer dies."""
        for c in self._master_conns + self._worker_conns:
            c.close()


class ShmMasterEnd:
    def __init__(self, params: Tensor, grads: Tensor, conns: list[Connection]) -> None:
        self.n_workers = len(conns)
        self.params = params
        self.grads = grads
        self.conns = conns
        self._index = {c: i for i, c in enumerate(conns)}
        self.gone: set[int] = set()

    def ready(self, timeout: float) -> list[int]:
        live = [c for i, c in enumerate(self.conns) if i not in self.gone]
        return sorted(self._index[c] for c in wait(live, timeout))

    def recv(self, worker: int) -> tuple[Any, Tensor]:
        try:
            meta = self.conns[worker].recv()
        except (EOFError, OSError):
            self.gone.add(worker)
            raise PeerGone(f"worker {worker} closed its connection") from None
        return meta, self.grads[worker]

    def send(self, worker: int, params: Tensor | None, meta: Any) -> None:
        if params is not None:
            self.params[worker].copy_(params)
        try:
            self.conns[worker].send(meta)
        except (BrokenPipeError, OSError):
            self.gone.add(worker)
            raise PeerGone(f"worker {worker} closed its connection") from None


class ShmWorkerEnd:
    def __init__(self, worker: int, params: Tensor, grad: Tensor, conn: Connection) -> None:
        self.worker = worker
        self.params = params
        self.grad = grad
        self.conn = conn

    def send(self, grad: Tensor | None, meta: Any) -> None:
        if grad is not None:
            self.grad.copy_(grad)
        try:
            self.conn.send(meta)
        except (BrokenPipeError, OSError):
            raise PeerGone("the master closed its connection") from None

    def recv(self, params_out: Tensor, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"worker {self.worker}: no message from the master in {timeout:g} s")
        try:
            meta = self.conn.recv()
        except (EOFError, OSError):
            raise PeerGone("the master closed its connection") from None
        if params_out is not None:
            params_out.copy_(self.params)
        return meta
