"""The coordinator's side of APAM's master, one process or K shards (``master_shards``):
the master processes' names and slices, and their messages joined into one master's:
a snapshot is scored once every shard has written its slice, the summary is the
leader's (the budget's keeper) with the latest wall time, a stop is the leader's (which
joined the checkpoint: :func:`~apam_gossip.checkpoint.join_parts`; see
:mod:`apam_gossip.algorithms.shards`).
Transport-agnostic: a runtime passes its messages on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ..config import ConfigError, RunConfig
from ..core.apam import Shard, shards_of
from ..messages import Interrupted, MasterSummary, Snapshot
from ..result import RunResult
from ..transport import WorkerEnd
from ..transport.sharded import ShardedWorkerEnd


class MasterShards:
    """``count`` masters over a model state of ``numel`` entries (``n_params`` trained);
    ``scorer(snapshot)`` scores a whole model (:class:`~apam_gossip.reporting.SnapshotScorer`)."""

    def __init__(self, cfg: RunConfig, numel: int, n_params: int,
                 scorer: Callable[[Snapshot], None], count: int | None = None) -> None:
        self.count = cfg.master_shards if count is None else count
        try:
            self.shards = shards_of(numel, n_params, self.count) if self.count > 1 else None
        except ValueError as e:
            raise ConfigError(str(e), "master_shards") from None
        self.names = ["master"] if self.shards is None else \
            [f"master {k}" for k in range(self.count)]
        self.numels = [numel] if self.shards is None else [s.numel for s in self.shards]
        self.scorer = scorer
        self.checkpoint = cfg.checkpoint
        self._snaps: dict[int, dict[int, Snapshot]] = {}  # slot -> shard -> its message
        self.summaries: dict[int, MasterSummary] = {}
        self.parts: dict[int, Interrupted] = {}

    def shard(self, k: int) -> Shard | None:
        return None if self.shards is None else self.shards[k]

    def worker_end(self, ends: list[WorkerEnd]) -> WorkerEnd:
        """A worker's end to the master: its one end, or its ends to the K shards as one."""
        return ends[0] if self.shards is None else ShardedWorkerEnd(ends, self.shards)

    def index(self, name: str) -> int:
        return 0 if self.shards is None else self.names.index(name)

    def snapshot(self, name: str, msg: Snapshot) -> None:
        if self.shards is None:
            self.scorer(msg)
            return
        got = self._snaps.setdefault(msg.slot, {})
        got[self.index(name)] = msg
        if len(got) == self.count:  # every slice of that model is written
            del self._snaps[msg.slot]
            self.scorer(replace(got[0], wall=max(m.wall for m in got.values())))

    def summarize(self, name: str, msg: MasterSummary) -> None:
        self.summaries[self.index(name)] = msg

    @property
    def summary(self) -> MasterSummary | None:
        """The master's summary once every shard has sent its own: the leader's counts
        and staleness (it applied exactly the budget), the last shard's wall time."""
        if len(self.summaries) < self.count:
            return None
        return replace(self.summaries[0],
                       wall_time=max(s.wall_time for s in self.summaries.values()))

    def stopped(self, name: str, msg: Interrupted) -> Interrupted | None:
        """A master stopped on request; the run's :class:`Interrupted` (the leader's: it
        joined the checkpoint) once every shard has, else None."""
        self.parts[self.index(name)] = msg
        return self.parts[0] if len(self.parts) == self.count else None

    def annotate(self, result: RunResult) -> RunResult:
        """Each shard's mean staleness on the final evaluation (``staleness_mean_shard<k>``;
        the run's own staleness is the leader's)."""
        if self.shards is not None and result.evals:
            extra = result.evals[-1].extra
            for k, s in sorted(self.summaries.items()):
                n = sum(s.staleness.values())
                extra[f"staleness_mean_shard{k}"] = \
                    sum(a * c for a, c in s.staleness.items()) / n if n else 0.0
        return result


__all__ = ["MasterShards"]
