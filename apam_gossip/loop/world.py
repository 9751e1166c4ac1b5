"""Centralized worker ranks' ``MPI.COMM_WORLD``: its collectives refuse in one line (see
:mod:`.collectives`). Its own module, imported by the session and the collectives alike,
so neither imports the other back."""

from __future__ import annotations

from typing import Any

from .base import LoopError

# the collectives of an MPI intracommunicator (and their non-blocking I-forms), plus the
# calls that make a communicator, which are collective too
_COLLECTIVES = ("allgather", "allreduce", "alltoall", "barrier", "bcast", "exscan", "gather",
                "reduce", "scan", "scatter", "Allgather", "Allgatherv", "Allreduce",
                "Alltoall", "Alltoallv", "Alltoallw", "Barrier", "Bcast", "Exscan", "Gather",
                "Gatherv", "Reduce", "Reduce_scatter", "Reduce_scatter_block", "Scan",
                "Scatter", "Scatterv")
_MAKERS = ("Dup", "Split", "Split_type", "Create", "Create_cart", "Create_graph")


def guard_world(rank: int) -> None:
    """Centralized worker ranks (the master exits at the end): ``MPI.COMM_WORLD`` becomes
    the same communicator whose collectives raise a :class:`LoopError` saying what to use
    (see the module docstring)."""
    from mpi4py import MPI

    def refuse(name: str):
        def call(self, *args: Any, **kwargs: Any) -> Any:
            raise LoopError(f"rank {rank}: MPI.COMM_WORLD.{name}() in a centralized job: "
                            "the master (rank 0, or ranks 0..K-1 with master_shards=K) is "
                            "a member of COMM_WORLD and never joins a collective of "
                            "yours, so it would wait forever; use "
                            "ag.allreduce, ag.broadcast or ag.barrier (among the workers)")
        return call

    names = [n for base in _COLLECTIVES for n in (base, "I" + base, "i" + base)
             if hasattr(MPI.Intracomm, n)] + [n for n in _MAKERS if hasattr(MPI.Intracomm, n)]
    guarded = type("GuardedWorld", (MPI.Intracomm,), {n: refuse(n) for n in names})
    MPI.COMM_WORLD = guarded(MPI.COMM_WORLD)


__all__ = ["guard_world"]
