"""What every part of the loop API shares: the session record, the mode's traits (chosen
once, at :func:`~apam_gossip.loop.init`), its error type and waits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from ..placement import mpi_workers

PROG = "apam-gossip"  # the prefix of every line the loop API prints, as the CLI's
# OptimConfig fields that shape the lr over a budget: the loop API has no budget (the
# user's loop is the budget) and takes the user's own schedule instead
NOT_LOOP_SETTINGS = ("schedule", "warmup")
INIT_DEFAULTS = {"topology": None, "adaptive_state": "local", "overlap": True,
                 "master": "exit", "master_shards": 1, "compress": "none",
                 "compress_gamma": None, "neighbour_choice": "uniform"}
MASTER_CHOICES = ("exit", "return")
ADAPTIVE_STATES = ("local", "tracked")
TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE")
T_METRIC = 41  # centralized: rank 1 -> master, the final model's score
T_RESULT = 42  # centralized: master -> rank 1 (the main worker), the job's RunResult
T_SHARD_REPORT = 43  # a sharded master: follower -> leader, its staleness at the end
# waiting for the other ranks to finish has no deadline of its own: they may train for
# hours longer (a slow worker); a rank that dies ends the whole MPI job anyway
NO_DEADLINE_S = 1e9


@dataclass(frozen=True)
class Traits:
    """What a mode is, for the parts of the loop API that are not its step strategy."""

    name: str
    master: bool  # under MPI rank 0 (ranks 0..K-1, sharded) is a master that never trains
    gossip: bool  # the workers average on a topology (adaptive_state, per-rank states)
    reference: int  # the rank whose model every rank starts from (under MPI, one master)


TRAITS = {t.name: t for t in (Traits("centralized", True, False, 1),
                              Traits("decentralized", False, True, 0),
                              Traits("allreduce", False, False, 0))}
MODES = tuple(TRAITS)


class LoopError(UserError):
    """A loop-API error: one line naming the rank. ``collective``: every rank raises the
    same one (a check they all make alike), so only rank 0 prints it."""

    def __init__(self, message: str, collective: bool = False) -> None:
        super().__init__(message)
        self.collective = collective


@dataclass
class Session:
    """One process's part of a loop-API job, from :func:`init` to ``finish()``."""

    traits: Traits
    comm: Any | None  # None: one process, no MPI
    rank: int
    size: int
    local_rank: int
    device: torch.device
    topology: str | None
    adaptive_state: str
    seed: int
    timeout_s: float
    result: str | None
    graph: Any = None
    overlap: bool = True
    optimizer: Any = None  # the job's DistributedOptimizer (loop.optimizer imports this)
    # the training ranks only (the centralized master left out), a communicator of their
    # own: a user's collective (ag.allreduce) can never match the library's messages
    workers_comm: Any = None
    master_done: bool = False  # centralized rank 0, back from init(master="return")
    metrics: Any = None  # rank 0: init(log=...)'s sinks (a runlog.MetricsLog)
    master_shards: int = 1  # centralized under MPI: ranks 0..K-1 are the master's shards
    compress: str = "none"  # decentralized: what an average sends (core.compress)
    compress_gamma: float | None = None
    neighbour_choice: str = "uniform"

    @property
    def mode(self) -> str:
        return self.traits.name

    @property
    def has_master(self) -> bool:
        """A master rank exists (a centralized job under MPI)."""
        return self.traits.master and self.comm is not None

    @property
    def n_masters(self) -> int:
        """How many ranks are the master: ``master_shards`` in a centralized job under
        MPI, else none."""
        return self.master_shards if self.has_master else 0

    @property
    def n_workers(self) -> int:
        return mpi_workers(self.n_masters, self.size)

    @property
    def worker_index(self) -> int:
        return self.rank - self.n_masters

    @property
    def is_master(self) -> bool:
        return self.rank < self.n_masters

    @property
    def reference(self) -> int:
        """The rank whose model every rank starts from: the first worker's in a
        centralized job (it follows the master's shards), else the mode's."""
        return self.n_masters if self.has_master else self.traits.reference

    @property
    def is_main_worker(self) -> bool:
        """The one training process that prints and saves: worker index 0 (rank 0, or
        the first rank after the centralized master's, rank 1 with one master)."""
        return not self.is_master and self.worker_index == 0


def wait(req: Any, s: Session, what: str, deadline: float | None = None) -> None:
    """Wait for an MPI request, at most ``deadline`` (default ``timeout_s``) seconds."""
    from ..transport.mpi import _wait

    _wait(req, s.timeout_s if deadline is None else deadline, f"rank {s.rank}: {what}",
          patient=True)


def warn_ignored(items: list[str]) -> None:
    from ..runlog import warn

    warn(f"ignored: {'; '.join(items)}")


def score(metric: Any, model: Any, who: str) -> float:
    """``metric(model)`` as a float, or a LoopError naming what it returned."""
    value = metric(model)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise LoopError(f"{who}: finish(metric=...) returned {type(value).__name__}, not a "
                        "number") from None
