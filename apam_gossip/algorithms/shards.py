"""The two roles of a sharded APAM master's processes (``master_shards = K > 1``; see
:mod:`apam_gossip.algorithms.apam` for the protocol as a whole).

* :class:`Leader` (shard 0) keeps the budget: it asks a worker for a gradient only while
  gradients are left to ask for (a worker it asks nothing more of waits), and it drops
  none, so every shard applies the same gradients. At a stop, and every
  ``checkpoint_every_s``, it makes a **consistent cut**: it asks for no more, applies the
  gradients already asked for, tells the followers the cut's version
  (:class:`~apam_gossip.messages.SaveAt`), saves its part, joins everyone's parts into one
  checkpoint of the whole model and goes on (or stops the workers).
* :class:`Follower` applies whatever reaches it, saves its part at the cut's version, and
  ends once every worker has gone, as the leader's word says
  (:class:`~apam_gossip.messages.Finish` or a stop request).

Both talk over a :class:`~apam_gossip.transport.ShardLink` (pipes on one machine, MPI
messages under mpirun); the workers know nothing of it.
"""

from __future__ import annotations

import time
from typing import Any

from ..checkpoint import join_parts, shard_part_path
from ..messages import Finish, Interrupted, PartSaved, SaveAt, StopRequest
from ..transport import ShardLink

# how long the leader waits for the followers' parts of a checkpoint, and a follower for
# the cut's version to arrive (a worker killed between its slices never brings it)
PART_TIMEOUT_S = 120.0
SAVE_GRACE_S = 30.0


class Leader:
    def __init__(self, m: Any, link: ShardLink) -> None:
        self.m, self.link = m, link
        self.asked = m.core.version  # gradients asked for (applied ones included)
        self.holding: set[int] = set()  # workers computing a gradient it asked for
        self.waiting: set[int] = set()  # workers it asks nothing of, for now
        self.stopping = False
        self.pausing = False  # a periodic checkpoint's cut
        self.last_cut = time.monotonic()

    def started(self) -> None:
        """Every worker has said hello: the checkpoints' clock starts (as one master's)."""
        self.last_cut = time.monotonic()

    def give(self, i: int) -> bool:
        """Whether to send worker ``i`` a model (ask it for a gradient); else it waits."""
        if i in self.holding:  # asked already (a dead worker's gradient was re-asked)
            return False
        if self.stopping or self.pausing or self.asked >= self.m.total:
            self.waiting.add(i)
            return False
        self.asked += 1
        self.holding.add(i)
        return True

    def took(self, i: int) -> None:
        self.holding.discard(i)

    def lost(self, i: int) -> None:
        self.waiting.discard(i)
        if i in self.holding:  # asked for a gradient that never comes: ask another
            self.holding.discard(i)
            self.asked -= 1
            if self.waiting and not (self.stopping or self.pausing):
                self.m.give(self.waiting.pop())

    def heard(self, msg: Any) -> None:
        """A follower's message outside a cut's parts: a stop request that reached its
        rank (forwarded), or a part too late for its cut (dropped: that cut has gone by
        without it)."""
        if isinstance(msg, StopRequest):
            self.stopping = True
        else:
            assert isinstance(msg, PartSaved), msg

    def ended_round(self) -> bool:
        """After each round of the master's loop: True once the master has ended."""
        m = self.m
        while m.ctrl.poll():
            msg = m.ctrl.recv()
            assert isinstance(msg, StopRequest), msg
            self.stopping = True
        for _, msg in self.link.poll():
            self.heard(msg)
        if m.checkpoint is not None and not self.stopping \
                and time.monotonic() - self.last_cut > m.checkpoint.every_s:
            self.pausing = True
        if not (self.stopping or self.pausing) or self.holding:
            return False
        path = self.cut() if m.checkpoint is not None else None
        while m.ctrl.poll():  # a stop that came during the cut: this cut is its checkpoint
            msg = m.ctrl.recv()
            assert isinstance(msg, StopRequest), msg
            self.stopping = True
        if self.stopping:
            m.stop_workers(idle=m.live())  # every live worker waits
            self.link.send(StopRequest())
            m.ctrl.send(Interrupted(path, m.core.version))
            return True
        self.pausing, self.last_cut = False, time.monotonic()
        resume, self.waiting = sorted(self.waiting), set()
        for i in resume:  # go on (a death meanwhile may have asked one of them already)
            if i not in m.gone:
                m.give(i)
        return False

    def cut(self) -> str | None:
        """A consistent checkpoint: every shard saves its part at this version (no
        gradient is asked for or in flight to the leader), the parts joined into
        ``checkpoint.path``; None (and the last checkpoint kept) if a follower's part
        does not come."""
        m = self.m
        assert m.checkpoint is not None and m.shard is not None
        version = m.core.version
        self.link.send(SaveAt(version, tuple(m.core.progress.updates_of)))
        m.save()
        parts = {0: m.part_path()}
        deadline = time.monotonic() + PART_TIMEOUT_S
        while len(parts) < m.shard.count:
            for k, msg in self.link.poll():
                if not isinstance(msg, PartSaved) or msg.cut != version:
                    self.heard(msg)
                    continue
                parts[k] = self.link.part_path(msg.payload, shard_part_path(
                    m.checkpoint.path, k, m.shard.count))
            if time.monotonic() > deadline:
                return None
            time.sleep(0.002)
        join_parts(m.checkpoint.path, [parts[k] for k in range(m.shard.count)])
        return m.checkpoint.path

    def finished(self) -> None:
        self.link.send(Finish())


class Follower:
    def __init__(self, m: Any, link: ShardLink) -> None:
        self.m, self.link = m, link
        self.word: Any = None  # the leader's end: Finish or StopRequest
        self.save_at: SaveAt | None = None
        self.save_by = 0.0

    def give(self, i: int) -> bool:
        return True

    def took(self, i: int) -> None:
        pass

    def lost(self, i: int) -> None:
        pass

    def _listen(self) -> None:
        m = self.m
        while m.ctrl.poll():  # a stop request to this rank (under mpirun): the leader's
            msg = m.ctrl.recv()  # to make, at a consistent cut
            assert isinstance(msg, StopRequest), msg
            self.link.send(StopRequest())
        for _, msg in self.link.poll():
            if isinstance(msg, SaveAt):
                self.save_at, self.save_by = msg, time.monotonic() + SAVE_GRACE_S
            else:
                self.word = msg
        if self.save_at is not None and (self.at_cut(self.save_at)
                                         or time.monotonic() > self.save_by):
            m.save()
            self.link.send(PartSaved(self.link.payload(m.part_path()), m.core.version,
                                     self.save_at.version))
            self.save_at = None

    def at_cut(self, cut: SaveAt) -> bool:
        """Whether this shard has applied every gradient the leader had at ``cut`` that
        can still come: all of each live worker's (they are in flight to it). A worker
        killed between its slices never sends the rest: this shard then saves without
        that last gradient, which the leader applied (the joined checkpoint's
        ``shard_versions`` say so), at once rather than after ``SAVE_GRACE_S``."""
        m = self.m
        if not cut.counts:  # (no counts: the version alone)
            return m.core.version >= cut.version or not m.live()
        have = m.core.progress.updates_of
        return all(have[w] >= cut.counts[w] for w in m.live())

    def ended_round(self) -> bool:
        m = self.m
        self._listen()
        if m.live():
            return False
        deadline = time.monotonic() + m.drain_timeout
        while self.word is None:  # every worker has gone: the leader has ended
            if time.monotonic() > deadline:
                assert m.shard is not None
                raise TimeoutError(f"master shard {m.shard.index}: no word of the leader's "
                                   f"end within {m.drain_timeout:g} s")
            time.sleep(0.002)
            self._listen()
        if isinstance(self.word, StopRequest):
            m.ctrl.send(Interrupted(None, m.core.version))
        else:
            assert isinstance(self.word, Finish), self.word
            m.finish(idle=set())
        return True

    def finished(self) -> None:
        pass


__all__ = ["Leader", "Follower", "PART_TIMEOUT_S", "SAVE_GRACE_S"]
