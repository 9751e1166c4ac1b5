"""The control messages between worker processes and the coordinator, one class each.

They travel through a control pipe on one machine (pickled; so they hold only plain
Python and numpy data, never torch tensors: a tensor would travel as a shared-memory
handle that an exiting sender could no longer serve) and stay in-process under MPI
(:class:`LocalOutbox`). Models travel separately, through the transports' buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


# -- worker/master -> coordinator ----------------------------------------------------
@dataclass(frozen=True)
class Hello:
    """A gossip worker has loaded its data and built its model."""

    worker: int


PROGRESS_EVERY_S = 0.25  # how often a run reports its progress (every runtime)


@dataclass(frozen=True)
class Progress:
    """How far training is (for progress display)."""

    samples: int
    updates: int


@dataclass(frozen=True)
class Snapshot:
    """A model to score is in slot ``slot`` of the shared snapshot buffer.

    ``wall`` is training seconds, ``samples``/``updates`` what the model has seen,
    ``train_loss`` the mean training loss since the previous snapshot, ``final`` marks
    the model at the end of the run, ``extra`` mode-specific measures (consensus)."""

    slot: int
    wall: float
    samples: int
    updates: int
    train_loss: float | None
    final: bool = False
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class MasterSummary:
    """The APAM master at the end: what it applied, from whom, how stale."""

    wall_time: float
    updates: int
    samples: int
    staleness: dict[int, int]
    updates_of: list[int]
    samples_of: list[int]
    failed_workers: list[int]


@dataclass(frozen=True)
class Finish:
    """Leader -> followers of a sharded APAM master: the leader (shard 0) has spent the
    budget; end as it did (once every worker has gone), with the final snapshot and a
    summary."""


@dataclass(frozen=True)
class SaveAt:
    """Leader -> followers of a sharded master: a consistent cut at ``version`` (every
    gradient asked for is applied there; ``counts[w]`` of worker ``w``'s); save your part
    of the checkpoint once you have applied as many of each live worker's."""

    version: int
    counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class PartSaved:
    """Follower -> leader: its part of the checkpoint is saved (``payload``: what the
    shard link carries of it, a path on one machine, the bytes under MPI), at its own
    ``version``, for the cut the leader called at version ``cut``."""

    payload: Any
    version: int
    cut: int = -1


@dataclass(frozen=True)
class Interrupted:
    """The master stopped early on request; ``checkpoint`` is where it saved (or None)."""

    checkpoint: str | None
    updates: int


@dataclass
class WorkerReport:
    """One worker's account at its end, the same record in every mode.

    ``updates``/``samples``: what it computed (centralized: the master counts what it
    applied); ``wall_time``: its training seconds (synchronous modes); ``finished_at``:
    the monotonic time it finished (gossip); ``staleness``: gossip's per-step staleness
    histogram; ``audit``/``audit_vhat``: the sums ``--audit`` checks (gossip)."""

    worker: int
    device: str
    compute_s: float
    sleep_s: float
    updates: int = 0
    samples: int = 0
    wall_time: float = 0.0
    finished_at: float = 0.0
    averages: int = 0
    refused_averages: int = 0  # gossip over MPI: the peer was mid-average, none happened
    staleness: dict[int, int] = field(default_factory=dict)
    train_loss: tuple[float, int] = (0.0, 0)  # (sum, count) of its training losses
    audit: np.ndarray | None = None
    audit_vhat: np.ndarray | None = None
    # gossip: whether its averages ran beside its gradients (None: the run ended before
    # the measured choice was made) and the probe's median step times
    overlap: bool | None = None
    overlap_probe: dict[str, float] | None = None
    neighbours: dict[int, int] | None = None  # gossip: how often it chose each neighbour


# -- star (centralized) data plane: each travels with a model or a gradient ----------------
@dataclass(frozen=True)
class Params:
    """Master -> worker: the model (in the transport's buffer) at ``version``."""

    version: int


@dataclass(frozen=True)
class Grad:
    """Worker -> master: a gradient (in the transport's buffer) computed at ``version``."""

    version: int
    samples: int
    loss: float
    compute_s: float
    lr: float | None = None  # the worker's learning rate (loop API); None: the master's


@dataclass(frozen=True)
class Bye:
    """Worker -> a follower shard of a sharded master: the leader has stopped this worker;
    nothing more will come (on shared memory the closed pipe says the same)."""


@dataclass(frozen=True)
class Stop:
    """Master -> worker: the run is over."""


# -- coordinator -> master ------------------------------------------------------------
@dataclass(frozen=True)
class StopRequest:
    """Checkpoint (if configured) and stop now (the job got SIGTERM, SIGUSR1 or Ctrl-C)."""


# -- process group -> coordinator -----------------------------------------------------
@dataclass(frozen=True)
class ChildError:
    """A child raised: its message and traceback (never tolerated)."""

    message: str
    details: str


@dataclass(frozen=True)
class Died:
    """A child whose death the run tolerates was killed (``how``: "killed by signal 9")."""

    how: str


class LocalOutbox:
    """Stands in for a control pipe when the coordinator is in the same process (MPI):
    messages are kept in order; ``live(msg)`` may consume one at once (returns True).
    :meth:`post` puts a request the other way (a :class:`StopRequest` from a signal
    handler), which the algorithm's :meth:`poll` / :meth:`recv` take; ``asked()``, when
    given, is another source of one: a stop request that reached another rank and came
    over the transport."""

    def __init__(self, live: Callable[[Any], bool] | None = None,
                 asked: Callable[[], bool] | None = None) -> None:
        self.messages: list[Any] = []
        self.live = live
        self.asked = asked
        self.inbox: list[Any] = []

    def send(self, msg: Any) -> None:
        if self.live is None or not self.live(msg):
            self.messages.append(msg)

    def post(self, msg: Any) -> None:
        self.inbox.append(msg)

    def poll(self) -> bool:
        if not self.inbox and self.asked is not None and self.asked():
            self.asked = None  # asked once
            self.inbox.append(StopRequest())
        return bool(self.inbox)

    def recv(self) -> Any:
        if not self.inbox:
            raise EOFError("nothing was posted to this in-process outbox")
        return self.inbox.pop(0)

    def of_type(self, cls: type) -> list[Any]:
        return [m for m in self.messages if isinstance(m, cls)]


# -- the loop API (apam_gossip.loop): worker rank <-> master rank, over the star ----------
@dataclass
class LoopReport:
    """One rank's account of its own training loop, at ``finish()``."""

    rank: int
    device: str
    steps: int
    samples: int
    wall_time: float  # from this rank's first step() to its finish()
    step_s: float  # time inside step(): communication and the optimizer
    averages: int = 0
    refused_averages: int = 0
    staleness: dict[int, int] = field(default_factory=dict)
    neighbours: dict[int, int] | None = None  # gossip: how often it chose each neighbour


@dataclass(frozen=True)
class Done:
    """Worker -> master: this worker's loop is over (``metric``: what the user measured;
    ``metric_follows``: it comes after the final model, measured on it)."""

    report: LoopReport
    metric: float | None = None
    metric_follows: bool = False
    metric_name: str = "accuracy"
    higher_is_better: bool = True


@dataclass(frozen=True)
class LoopFault:
    """Master -> worker: your request cannot be served (``message`` says why, naming the
    rank); the worker raises it as a one-line error."""

    message: str


@dataclass(frozen=True)
class StateRequest:
    """Worker -> master: send me your state (for ``state_dict()``)."""


@dataclass(frozen=True)
class StateCounts:
    """Shard -> worker, the answer to a :class:`StateRequest` under a sharded master: how
    many gradients of each worker this shard has applied (``counts[w]``), the first half
    of a consistent ``state_dict()`` (see :mod:`apam_gossip.loop.master`)."""

    counts: tuple[int, ...]


@dataclass(frozen=True)
class StateAt:
    """Worker -> every shard: send your state once you have applied exactly ``target[w]``
    gradients of each worker ``w`` (the most any shard had applied), holding back any
    later one until then; answered by :class:`LoopState`."""

    target: tuple[int, ...]


@dataclass(frozen=True)
class LoopState:
    """The master's state (numpy, pickled by value): ``x``, the optimizer's ``opt`` and
    the update count ``version``; master -> worker for ``state_dict()``, worker ->
    master for ``load_state_dict()`` (answered by ``Params``)."""

    x: np.ndarray
    opt: dict[str, np.ndarray]
    version: int
    counts: tuple[int, ...] | None = None  # a shard's part of a cut: its StateCounts there
