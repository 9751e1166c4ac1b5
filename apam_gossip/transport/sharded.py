"""One worker's ends to the K shards of a sharded APAM master, as one star end.

Transport-agnostic: it wraps K :class:`~apam_gossip.transport.WorkerEnd` (shared memory or
MPI alike) and splits each message by the shards' slices
(:class:`~apam_gossip.core.apam.Shard`). A worker's loop is the same with one master or K.

* ``send``: slice ``k`` of the gradient to shard ``k``, shard 0 (the leader, which keeps
  the budget) first. A :class:`~apam_gossip.messages.Grad` goes to shard ``k`` with the
  version of the slice shard ``k`` sent last, so each shard measures its own staleness.
* ``recv``: every shard's slice of the model into its place in ``params_out``, the
  followers' first (the leader may hold a worker; a follower never does); returns
  :class:`~apam_gossip.messages.Params` with the leader's version, or the leader's
  :class:`~apam_gossip.messages.Stop`: then every follower's reply to the last gradient
  has been taken too, and each follower is told :class:`~apam_gossip.messages.Bye`
  (a follower ends once every worker has gone).

A follower that has gone (it ends once every worker has gone, so only at the very end of
a run a dead worker disturbed) is skipped; the leader gone is the master gone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from ..core.apam import Shard
from ..messages import Bye, Grad, Params, Stop
from . import PeerGone, WorkerEnd


class ShardedWorkerEnd:
    def __init__(self, ends: list[WorkerEnd], shards: list[Shard]) -> None:
        assert len(ends) == len(shards) > 1 and shards[0].leader
        self.worker = ends[0].worker
        self.ends, self.shards = ends, shards
        self.versions = [0] * len(ends)  # the version of each slice of the last model
        self.gone: set[int] = set()  # followers that have ended

    def send(self, grad: Tensor | None, meta: Any) -> None:
        for k, (end, shard) in enumerate(zip(self.ends, self.shards, strict=True)):
            if k in self.gone:
                continue
            m = dataclasses.replace(meta, version=self.versions[k]) \
                if isinstance(meta, Grad) else meta
            try:
                end.send(None if grad is None else shard.of(grad), m)
            except PeerGone:
                if k == 0:
                    raise
                self.gone.add(k)

    def recv(self, params_out: Tensor | None, timeout: float) -> Any:
        stop = None
        # the followers' replies first: each answers at once, while the leader may keep a
        # worker waiting (for the end, or a checkpoint's cut) and under MPI a reply not
        # yet received blocks its sender, which must go on to save its part
        for k in [*range(1, len(self.ends)), 0]:
            end, shard = self.ends[k], self.shards[k]
            if k in self.gone:
                continue
            out = None if params_out is None else shard.of(params_out)
            try:
                msg = end.recv(out, timeout)
            except PeerGone:
                if k == 0:
                    raise
                self.gone.add(k)
                continue
            if isinstance(msg, Stop):  # only the leader stops a worker
                stop = msg
                continue
            assert isinstance(msg, Params), msg
            self.versions[k] = msg.version
        if stop is None:
            return Params(self.versions[0])
        # the followers' replies to the last gradient were taken above (under MPI a
        # reply nobody receives would block its sender); now tell them this is the end
        for k in range(1, len(self.ends)):
            if k not in self.gone:
                try:
                    self.ends[k].send(None, Bye())
                except PeerGone:
                    pass
        return stop


__all__ = ["ShardedWorkerEnd"]
