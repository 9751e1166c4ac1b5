"""One row of shared state per worker (its model, its optimizer state), kept where that
worker computes.

CPU workers: one ``(n, *shape)`` tensor in host shared memory; row ``i`` is a view of it.
GPU workers: row ``i`` is its own tensor on worker ``i``'s GPU. The coordinator allocates
every row and keeps it alive for the whole run (CUDA IPC's rule: the process that made an
allocation must outlive its users); torch's multiprocessing pickles a CUDA tensor into a
spawned worker as an IPC handle, so every process of the host addresses the same device
memory. A pairwise average of two GPU workers is then a device-side operation, and a
worker's local step runs on its own GPU, with no trip through host memory. Locks,
versions and counters stay in host shared memory.

CUDA work is asynchronous, and each process has its own streams: a process that wrote or
read a row under a lock makes that work complete (:func:`fence`) before it releases the
lock, so the next holder, in whichever process, sees it whole. Only the stream that did
the work waits: the communication thread's own stream for an average, the compute stream
for the short snapshot and local step, whose results the next step needs anyway.

``APAM_GOSSIP_ROWS=separate`` in the environment makes host rows separate tensors too
(each in its own shared segment), so that a CPU machine runs the code path GPU rows take
(the test suite does, to cover it where CI has no GPU). ``APAM_GOSSIP_ROWS=host`` keeps
every row in host shared memory even for GPU workers, the fallback where CUDA IPC is not
available (some virtual machines, WSL2): each worker then stages through the host, as
workers over MPI do, and its local step runs on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor


def fence(*tensors: Tensor) -> None:
    """Wait until this thread's current stream has finished its work on ``tensors``' GPUs
    (nothing to wait for on the CPU)."""
    seen: set[torch.device] = set()
    for t in tensors:
        if t.is_cuda and t.device not in seen:
            seen.add(t.device)
            torch.cuda.current_stream(t.device).synchronize()


class Rows:
    """``n`` rows of ``shape``, row ``i`` on ``devices[i]`` (default: all in host shared
    memory). Indexing gives a row; :meth:`copy_` and :meth:`clone` move all of them at once
    (to and from a host ``(n, *shape)`` tensor), for starts, checkpoints and evaluations."""

    def __init__(self, n: int, shape: Sequence[int] | int, dtype: torch.dtype = torch.float32,
                 devices: Sequence[torch.device | str] | None = None) -> None:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        devs = [torch.device(d) for d in devices] if devices is not None \
            else [torch.device("cpu")] * n
        if len(devs) != n:
            raise ValueError(f"Rows: {len(devs)} devices for {n} rows")
        if os.environ.get("APAM_GOSSIP_ROWS") == "host":  # no CUDA IPC: see the module
            devs = [torch.device("cpu")] * n
        self.shape = (n, *shape)
        self.dtype = dtype
        self.devices = devs
        self.on_gpu = any(d.type == "cuda" for d in devs)
        if self.on_gpu or os.environ.get("APAM_GOSSIP_ROWS") == "separate":
            self._host = None
            self._rows = [_shared(torch.zeros(shape, dtype=dtype, device=d)) for d in devs]
        else:
            self._host = torch.zeros(self.shape, dtype=dtype).share_memory_()
            self._rows = list(self._host)

    def __getstate__(self) -> dict:
        # host rows travel as the one shared tensor (views are rebuilt on arrival), GPU
        # rows each as its CUDA IPC handle
        d = dict(self.__dict__)
        if self._host is not None:
            d["_rows"] = None
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        if self._host is not None:
            self._rows = list(self._host)

    def only(self, keep: set[int]) -> Rows:
        """These rows as a process that uses only rows ``keep`` sees them: separate rows
        outside ``keep`` are left out (a pickled GPU row opens its IPC handle, and with
        it a CUDA context on that row's GPU, in every process it reaches); host rows are
        one block either way. Indexing a row left out is an error."""
        if self._host is not None:
            return self
        out = object.__new__(Rows)
        out.__dict__.update(self.__dict__)
        out._rows = [r if k in keep else None for k, r in enumerate(self._rows)]
        return out

    @property
    def separate(self) -> bool:
        """Whether each row is its own tensor (GPU rows), not a view of one host block."""
        return self._host is None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int | tuple) -> Tensor:
        """Row ``i``; ``rows[i, ...]`` indexes into it."""
        row = self._rows[i[0] if isinstance(i, tuple) else i]
        assert row is not None, f"row {i} is not in this process (see Rows.only)"
        return row[i[1:]] if isinstance(i, tuple) else row

    def copy_(self, src: Tensor) -> Rows:
        """Every row from the host tensor ``src`` (``(n, *shape)``, or one row's shape:
        the same for all)."""
        if self._host is not None:
            self._host.copy_(src)
            return self
        for i, r in enumerate(self._rows):
            r.copy_(src[i] if src.dim() == len(self.shape) else src)
        fence(*self._rows)
        return self

    def clone(self) -> Tensor:
        """A host copy of every row, ``(n, *shape)``."""
        if self._host is not None:
            return self._host.clone()
        out = torch.stack([r.cpu() for r in self._rows])  # .cpu() waits for the copy
        return out

    def normal_(self) -> Rows:
        for r in self._rows:
            r.normal_()
        fence(*self._rows)
        return self


def _shared(t: Tensor) -> Tensor:
    return t.share_memory_() if t.device.type == "cpu" else t  # CUDA: shared by IPC


__all__ = ["Rows", "fence"]
