"""Collectives among the training ranks: :func:`allreduce`, :func:`broadcast`,
:func:`barrier` (Horovod's ``hvd.allreduce``/``hvd.broadcast_object``/``hvd.join``
habits).

They run on a communicator of the training ranks alone (:attr:`Session.workers_comm`,
split from the world at :func:`~apam_gossip.loop.init`): the centralized master, which
never leaves ``init()``, takes no part, and nothing a user sends can match a message of
the library (the gossip servers, the master, the all-reduce steps), whatever it does on
its own communicators. Every training rank must call each collective, in the same order,
before or after ``finish()``. Waiting has no deadline (another rank may still be training
for hours), as ``finish()``'s.

One rule per mode for calling them *before* ``finish()``: in ``decentralized`` and
``centralized`` mode anywhere (a rank that waits in a collective still answers its
neighbours' averages; the master serves the others meanwhile); in ``allreduce`` mode only
where every rank has taken the same number of steps (its steps are collectives too: a
rank waiting in yours would leave the others waiting in their next step; after
``finish()`` is always safe).

A collective of your own on ``MPI.COMM_WORLD`` works in ``decentralized`` and
``allreduce`` mode (the library's traffic is on communicators of its own). In a
centralized job the master is a member of COMM_WORLD and never joins a user's collective
(with ``init(master="exit")``, the default, it has exited by then), so it would wait
forever: there :func:`guard_world` makes ``MPI.COMM_WORLD``'s collectives on the worker
ranks raise one clear :class:`LoopError` instead (point-to-point calls work as before).
A script that kept its own reference to COMM_WORLD from before ``init()`` is not covered.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import NO_DEADLINE_S, LoopError, Session, wait
from .session import current
from .world import guard_world  # noqa: F401 - its public home stays here

OPS = ("average", "sum", "min", "max")


def _workers(what: str) -> Session:
    s = current(what)
    if s.is_master:
        raise LoopError(f"rank {s.rank}: {what} on the centralized master: collectives "
                        "are among the workers (the master's ranks never leave init(); call "
                        "it in the workers' code, after init())")
    return s


def allreduce(value: Any, op: str = "average") -> Any:
    """``value`` reduced over every training rank: ``op`` is ``average`` (the default),
    ``sum``, ``min`` or ``max``. ``value``: a number (a float comes back; ``sum``, ``min``
    and ``max`` of ints give an int), a tensor (the same shape, dtype and device; an
    integer tensor's average is float64) or a numpy array (likewise). Collective."""
    s = _workers("ag.allreduce()")
    if op not in OPS:
        raise LoopError(f"ag.allreduce: op must be one of {', '.join(OPS)}, got {op!r}")
    if isinstance(value, bool) or isinstance(value, Tensor | np.ndarray) and \
            value.dtype in (torch.bool, np.bool_):
        raise TypeError("ag.allreduce: booleans cannot be reduced; convert to int (sum "
                        "counts the ranks where it is true)")
    if isinstance(value, Tensor):
        kind = "tensor"
        t = value.detach().to("cpu", copy=True).contiguous()
    elif isinstance(value, np.ndarray):
        kind = "numpy"
        t = torch.from_numpy(np.ascontiguousarray(value).copy())
    elif isinstance(value, int | float | np.integer | np.floating):
        kind = "int" if isinstance(value, int | np.integer) else "float"
        t = torch.tensor([value], dtype=torch.int64 if kind == "int" else torch.float64)
    else:
        raise TypeError(f"ag.allreduce: value must be a number, a tensor or a numpy array, "
                        f"got {type(value).__name__} (use ag.broadcast for other objects)")
    if op == "average" and not t.is_floating_point():
        t = t.double()
    if s.workers_comm is not None and s.n_workers > 1:
        from .torchcomm import iallreduce

        wait(iallreduce(s.workers_comm, t.numpy(), "sum" if op == "average" else op), s,
             f"ag.allreduce ({op}) with the other workers", NO_DEADLINE_S)
    if op == "average":
        t /= s.n_workers
    if kind == "tensor":
        dtype = value.dtype if value.is_floating_point() or op != "average" else t.dtype
        return t.to(device=value.device, dtype=dtype).reshape(value.shape)
    if kind == "numpy":
        return t.numpy()
    return float(t[0]) if op == "average" or kind == "float" else int(t[0])


def broadcast(value: Any, root: int = 0) -> Any:
    """The ``root`` worker's ``value`` (``root`` is a :func:`~apam_gossip.loop.worker_index`),
    returned on every training rank: a tensor (into the caller's device and dtype) or
    any picklable object. Collective."""
    s = _workers("ag.broadcast()")
    if not isinstance(root, int) or not 0 <= root < s.n_workers:
        raise LoopError(f"ag.broadcast: root must be a worker index 0..{s.n_workers - 1}, "
                        f"got {root!r}")
    if s.workers_comm is None or s.n_workers == 1:
        return value
    payload = pickle.dumps(value.detach().cpu() if isinstance(value, Tensor) else value) \
        if s.worker_index == root else b""
    n = np.array([len(payload)], dtype=np.int64)
    wait(s.workers_comm.Ibcast(n, root=root), s, "ag.broadcast's size", NO_DEADLINE_S)
    buf = np.frombuffer(payload, dtype=np.uint8).copy() if s.worker_index == root \
        else np.empty(int(n[0]), dtype=np.uint8)
    wait(s.workers_comm.Ibcast(buf, root=root), s, f"ag.broadcast from worker {root}",
         NO_DEADLINE_S)
    out = pickle.loads(buf.tobytes()) if s.worker_index != root else value
    if isinstance(value, Tensor) and isinstance(out, Tensor):
        out = out.to(device=value.device, dtype=value.dtype)
    return out


def barrier() -> None:
    """Wait until every training rank has called it. Collective."""
    s = _workers("ag.barrier()")
    if s.workers_comm is not None and s.n_workers > 1:
        wait(s.workers_comm.Ibarrier(), s, "ag.barrier with the other workers",
             NO_DEADLINE_S)


__all__ = ["allreduce", "broadcast", "barrier", "guard_world", "OPS"]  # guard_world: .world
