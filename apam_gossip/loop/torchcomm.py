"""The loop API under ``torchrun`` (or a PyTorchJob: ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``): :class:`TorchComm`, the part of an mpi4py communicator
the all-reduce mode and the collectives use, on ``torch.distributed``'s gloo backend.

What each transport supports:

* **MPI** (``apam-gossip launch``, ``mpirun``, ``srun``): every mode.
* **torch.distributed** (``torchrun``): ``allreduce``, ``ag.allreduce``,
  ``ag.broadcast``, ``ag.barrier`` and the queries, with the same semantics and the same
  numbers as under MPI (the reductions are sums of the same host tensors; the order of
  the additions differs beyond 2 ranks). The asynchronous modes are not offered there
  yet: gossip's pairwise averages and APAM's master answer whichever peer asks first,
  and their protocol is written on MPI's probe and any-source receives (a version on
  gloo's any-source receive is not built). ``init()`` says so in one line. Reductions
  run in host memory on gloo, as on MPI, also for GPU models.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import numpy as np
import torch

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Started by torchrun or a PyTorchJob (the env:// rendezvous variables are set)."""
    return all(k in os.environ for k in TORCHRUN_ENV)


class _Req:
    """An mpi4py-like request over a ``torch.distributed`` Work."""

    def __init__(self, work: Any) -> None:
        self.work = work

    def Test(self, status: Any = None) -> bool:  # noqa: N802 - mpi4py's name
        return self.work is None or self.work.is_completed()

    def Wait(self) -> None:  # noqa: N802
        if self.work is not None:
            self.work.wait()


_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def _tensor(buf: Any) -> torch.Tensor:
    """A host tensor sharing ``buf``'s memory (a numpy array or a tensor)."""
    t = torch.from_numpy(buf) if isinstance(buf, np.ndarray) else buf
    assert t.device.type == "cpu" and t.is_contiguous(), "gloo reduces host tensors"
    return t


class TorchComm:
    """The communicator of a torchrun job (see the module docstring), its method names
    mpi4py's, so the loop API's collective code is the same for both."""

    transport_name = "torch.distributed"

    def __init__(self, timeout_s: float = 600.0, group: Any = None) -> None:
        import torch.distributed as dist

        self.dist = dist
        if not dist.is_initialized():
            import atexit

            dist.init_process_group("gloo", timeout=timedelta(seconds=float(timeout_s)))
            atexit.register(_close)  # a group left to the interpreter's end may abort
        self.group = group
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def Split(self, color: Any = 0, key: int = 0) -> TorchComm:  # noqa: N802
        """A communicator of its own over every rank (the all-reduce mode has no master
        to leave out): the user's collectives never meet the library's."""
        return TorchComm(group=self.dist.new_group(list(range(self.size))))

    def Get_rank(self) -> int:  # noqa: N802
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.size

    def Ibarrier(self) -> _Req:  # noqa: N802
        return _Req(self.dist.barrier(group=self.group, async_op=True))

    def iallreduce(self, buf: Any, op: str = "sum") -> _Req:
        red = getattr(self.dist.ReduceOp, _OPS[op])
        return _Req(self.dist.all_reduce(_tensor(buf), op=red, group=self.group,
                                            async_op=True))

    def Ibcast(self, buf: Any, root: int = 0) -> _Req:  # noqa: N802
        return _Req(self.dist.broadcast(_tensor(buf), src=root, group=self.group,
                                           async_op=True))

    def allgather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        out: list[Any] | None = [None] * self.size if self.rank == root else None
        self.dist.gather_object(obj, out, dst=root, group=self.group)
        return out

    def bcast(self, obj: Any, root: int = 0) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=root, group=self.group)
        return box[0]

    def Abort(self, code: int = 1) -> None:  # noqa: N802
        """End this process at once; torchrun's agent then stops the other ranks."""
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def local_placement(self) -> tuple[int, int, int]:
        """(local rank, ranks on this host, 0 master ranks: torchrun runs allreduce
        only), from torchrun's variables."""
        local = int(os.environ.get("LOCAL_RANK", self.rank))
        on_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.size))
        return local, on_node, 0


def _close() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:  # every rank reaches the end before any group is torn down
            dist.barrier()
        finally:
            dist.destroy_process_group()


def iallreduce(comm: Any, buf: Any, op: str = "sum") -> Any:
    """An in-place all-reduce of ``buf`` (sum, min or max) on an mpi4py communicator or a
    :class:`TorchComm`; returns the request."""
    if isinstance(comm, TorchComm):
        return comm.iallreduce(buf, op)
    from mpi4py import MPI  # here: importing mpi4py initializes MPI

    return comm.Iallreduce(MPI.IN_PLACE, buf,
                           op={"sum": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX}[op])


__all__ = ["TorchComm", "launched_by_torchrun", "iallreduce", "TORCHRUN_ENV"]
