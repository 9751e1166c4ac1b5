"""Rank 0 of a centralized loop-API job: the APAM master's rule
(:class:`~apam_gossip.core.apam.ApamCore`) served to the workers' own loops.

**Sharded** (``init(master_shards=K)``): ranks 0..K-1 each serve the rule over their slice
of the model (:class:`~apam_gossip.core.apam.Shard`), in the order gradients reach them,
as ``train --master-shards`` does; there is no budget to keep, so every shard serves until
every worker has finished. ``state_dict()`` is a consistent cut, without stopping the job:
the worker asks shard 0, then the others (:class:`~apam_gossip.messages.StateRequest`;
shard 0 opens one cut at a time, so every shard takes the cuts in one order); each answers
with how many gradients of each worker it has applied
(:class:`~apam_gossip.messages.StateCounts`) and from then on holds back every gradient
that arrives; the worker sends the most of each count (:class:`~apam_gossip.messages.StateAt`);
each shard applies what it held up to those counts (the gradients in flight: a worker
sends a gradient to every shard before it computes the next, so each counted gradient
reaches every shard), answers with its state there and goes on. Every slice then holds
the same gradients, so the joined state is one the whole master could have had, and it
loads with any number of shards. While a cut is pending a worker may apply at most one
gradient past it at no shard, so no shard overshoots (asserted). Several workers may ask
at once: their cuts follow one another in shard 0's order, each at counts at least the
previous one's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import OptimConfig
from ..core.apam import ApamCore, Shard, shards_of
from ..flat import flatten
from ..messages import (
    Done,
    Grad,
    Hello,
    LoopFault,
    LoopState,
    Params,
    StateAt,
    StateCounts,
    StateRequest,
    Stop,
)
from ..result import RunResult
from .agree import Signature, agree
from .base import (
    NO_DEADLINE_S,
    T_METRIC,
    T_RESULT,
    T_SHARD_REPORT,
    LoopError,
    Session,
    wait,
)
from .report import finish_rank0, loop_result


@dataclass
class MasterHandle:
    """What a centralized master's :func:`init` returns with ``master="return"``."""

    result: RunResult
    state: Tensor  # the final model: [trained parameters | float buffers]

    def load_into(self, model: nn.Module) -> nn.Module:
        """Copy the final model into ``model`` (built as the workers build theirs)."""
        flat = flatten(model, who="the model")
        if flat.numel != self.state.numel():
            raise LoopError(f"the model has {flat.numel} entries, the master's "
                            f"{self.state.numel()}: build the workers' model")
        flat.state.copy_(self.state)
        return model


@dataclass
class _Cut:
    """A pending ``state_dict()`` on a sharded master: who asked, and (once it comes) the
    gradient counts to answer at."""

    worker: int
    target: tuple[int, ...] | None = None


class LoopMaster:
    """Rank 0 of a centralized loop-API job (or shard ``k``, rank ``k``, of a sharded
    one): the APAM master's rule (:class:`~apam_gossip.core.apam.ApamCore`) driven by the
    workers' loops instead of a budget: each gradient brings its worker's lr, and it
    serves until every worker has finished."""

    def __init__(self, s: Session, sig: Signature, x0: Tensor, end: Any = None) -> None:
        """``end``: the star's master end (default: MPI's, to the workers after the
        master's ranks; a test gives its own)."""
        from ..transport.mpi import MpiStarMaster

        self.s = s
        self.lr0 = sig.lr0
        k = s.n_masters
        self.shards: list[Shard] | None = shards_of(sig.numel, sig.n_params, k) \
            if k > 1 else None
        self.shard = self.shards[s.rank] if self.shards is not None else None
        numel, n_params = (self.shard.numel, self.shard.n_params) if self.shard else \
            (sig.numel, sig.n_params)
        self.numel, self.n_params = sig.numel, sig.n_params  # the whole model's
        self.end = MpiStarMaster(s.comm, numel, timeout=s.timeout_s, pin=False,
                                 first_worker=k) if end is None else end
        self.hp = OptimConfig(**dict(sig.optim), lr=sig.lr0 or 1.0)
        self.n = self.end.n_workers
        self.m = ApamCore(x0 if self.shard is None else self.shard.of(x0), self.hp, self.n,
                          n_params=n_params)
        self.cuts: list[_Cut] = []  # sharded: pending state_dict()s, in arrival order
        self.held: dict[int, tuple[Grad, Tensor]] = {}  # gradients held back by a cut
        self.asking: list[int] = []  # shard 0: workers whose cut waits for the current
        self.torch_step = None
        if sig.torch_opt is not None:  # the workers wrap an optimizer: apply with a copy
            from .wrapped import master_step

            shapes = [tuple(e[2]) for e in sig.entries if e[0] == "parameter"]
            self.torch_step = master_step(sig.torch_opt, self.m.x, sig.n_params, shapes,
                                          self.hp)
            self.m.opt = self.torch_step
            self.m.state = {}
        self.done: dict[int, Done] = {}
        self.loading: dict[int, LoopState] = {}
        self.applied = False

    def fault(self, i: int, message: str) -> None:
        self.end.send(i, None, LoopFault(message))

    def who(self, i: int) -> str:
        return f"rank {i + self.s.n_masters}"

    # -- the sharded master's consistent state_dict() (see the module docstring) -------
    def counts(self) -> tuple[int, ...]:
        return tuple(self.m.progress.updates_of)

    def may_apply(self, i: int) -> bool:
        """Whether worker ``i``'s next gradient may be applied now: no cut pending, or the
        first one's counts known and not reached for ``i``."""
        if not self.cuts:
            return True
        target = self.cuts[0].target
        return target is not None and self.m.progress.updates_of[i] < target[i]

    def on_grad(self, i: int, msg: Grad, grad: Tensor) -> None:
        if self.cuts and (i in self.held or not self.may_apply(i)):
            assert i not in self.held, "a worker sends its next gradient after the reply"
            self.held[i] = (msg, grad.clone())  # the receive buffer is reused
            return
        self.apply(i, msg, grad)
        if self.cuts:  # the gradient a cut waited for
            self.settle()

    def apply(self, i: int, msg: Grad, grad: Tensor) -> None:
        m = self.m
        m.apply(i, grad, msg.version, msg.samples, msg.lr)
        self.applied = True
        self.end.send(i, m.model_for_workers(), Params(m.version))

    def settle(self) -> None:
        """Answer every cut whose counts are reached, applying the held gradients up to
        them; with no cut left, apply the rest."""
        while self.cuts and self.cuts[0].target is not None:
            target = self.cuts[0].target
            counts = self.counts()
            assert all(c <= t for c, t in zip(counts, target, strict=True)), (counts, target)
            if counts == target:
                self.end.send(self.cuts.pop(0).worker, None, self.state())
                if self.asking:  # shard 0: the next cut in the one order
                    self.open_cut(self.asking.pop(0))
                continue
            ready = [i for i in sorted(self.held) if counts[i] < target[i]]
            if not ready:
                return  # the gradients it needs are in flight
            for i in ready:
                self.apply(i, *self.held.pop(i))
        if not self.cuts:
            for i in sorted(self.held):
                self.apply(i, *self.held.pop(i))

    def on_state_request(self, i: int) -> None:
        """The first half of worker ``i``'s cut. Shard 0 opens one cut at a time and a
        worker asks the other shards only once shard 0 has answered, so every shard sees
        the cuts in one order, and each cut's counts are at least the one before's (shard
        0's are): no shard passes a cut's counts on its way to an earlier one's."""
        if self.s.rank == 0 and self.cuts:
            self.asking.append(i)
        else:
            self.open_cut(i)

    def open_cut(self, i: int) -> None:
        self.cuts.append(_Cut(i))
        self.end.send(i, None, StateCounts(self.counts()))

    def state(self) -> LoopState:
        m = self.m
        assert m.state is not None
        if self.torch_step is not None:
            from .wrapped import to_bytes

            opt = {"torch": to_bytes(self.torch_step.torch.state_dict())}
        else:
            opt = {k: v.numpy().copy() for k, v in m.state.items()}
        return LoopState(m.x.numpy().copy(), opt, m.version,
                         self.counts() if self.shard is not None else None)

    def on_load(self, i: int, st: LoopState) -> None:
        """A worker's load_state_dict: resume once every live worker has loaded."""
        m = self.m
        if self.applied:
            self.fault(i, f"{self.who(i)}: load_state_dict() after training started: every "
                       "worker loads before its first step()")
            return
        if self.done:
            self.fault(i, f"{self.who(i)}: load_state_dict() after {self.who(min(self.done))} "
                       "finished without loading: every worker loads the same state before "
                       "its first step(), or none does")
            return
        self.loading[i] = st
        if set(self.loading) != set(range(self.n)) - set(self.done):
            return  # the others are still loading: their replies wait
        first = self.loading[min(self.loading)]
        for j, other in self.loading.items():
            if other.version != first.version or not np.array_equal(other.x, first.x):
                for k in self.loading:
                    self.fault(k, f"{self.who(j)}: load_state_dict: its state (update "
                               f"{other.version}) is not {self.who(min(self.loading))}'s "
                               f"(update {first.version}): load the same checkpoint on "
                               "every worker")
                self.loading.clear()
                return
        if self.torch_step is not None:
            from .wrapped import from_bytes

            self.torch_step.torch.load_state_dict(from_bytes(first.opt["torch"]))
            m.restore(torch.from_numpy(first.x), {}, version=int(first.version))
        else:
            m.restore(torch.from_numpy(first.x),
                      {k: torch.from_numpy(v) for k, v in first.opt.items()},
                      version=int(first.version))
        for j in sorted(self.loading):
            self.end.send(j, m.x, Params(m.version))
        self.loading.clear()

    def handle(self, i: int, msg: Any, grad: Tensor | None) -> None:
        """One message of worker ``i`` (after the hellos)."""
        if isinstance(msg, Grad):
            assert grad is not None
            if self.loading:
                self.fault(i, f"{self.who(i)}: step() while other workers load a "
                           "checkpoint: every worker loads before its first step()")
                return
            self.on_grad(i, msg, grad)
        elif isinstance(msg, Done):
            self.done[i] = msg
            # the loading workers wait for every live worker to load: one that
            # finished instead never will (misuse: one line, not a hang)
            for k in sorted(self.loading):
                self.fault(k, f"{self.who(k)}: load_state_dict() while {self.who(i)} "
                           "finished without loading: every worker loads the same state "
                           "before its first step(), or none does")
            self.loading.clear()
        elif isinstance(msg, StateRequest):
            if self.shard is None:
                self.end.send(i, None, self.state())
            else:  # the first half of a consistent cut
                self.on_state_request(i)
        elif isinstance(msg, StateAt):
            cut = next(c for c in self.cuts if c.worker == i and c.target is None)
            cut.target = tuple(msg.target)
            self.settle()
        elif isinstance(msg, LoopState):
            self.on_load(i, msg)
        else:
            raise AssertionError(f"unexpected message from {self.who(i)}: {msg!r}")

    def serve(self) -> MasterHandle:
        m, end, s = self.m, self.end, self.s
        me = f"rank {s.rank} (master{f' shard {s.rank}' if self.shard else ''})"
        waiting = set(range(self.n))
        deadline = time.monotonic() + s.timeout_s
        while waiting:  # every worker has its model (a rank that dies ends the job)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{me}: {', '.join(self.who(i) for i in sorted(waiting))} "
                                   f"did not start within timeout_s={s.timeout_s:g} s")
            for i in end.ready(1.0):
                msg, _ = end.recv(i)
                assert isinstance(msg, Hello), msg
                waiting.discard(i)
        for i in range(self.n):
            end.send(i, m.x, Params(0))
        while set(range(self.n)) - set(self.done):
            # no deadline: a worker may do anything between two steps (an evaluation);
            # a rank that dies ends the whole job
            for i in end.ready(1.0):
                self.handle(i, *end.recv(i))
        assert not (self.cuts or self.held or self.asking), (self.cuts, sorted(self.held))
        for i in sorted(self.done):
            end.send(i, None, Stop())
        final = self.final_model()
        if self.shard is not None and s.rank != 0:  # a follower: its staleness to rank 0
            s.comm.send((dict(m.progress.staleness), m.version), dest=0, tag=T_SHARD_REPORT)
            result = s.comm.recv(source=0, tag=T_RESULT)
            return MasterHandle(result, final)
        reports = [self.done[i].report for i in sorted(self.done)]
        first = self.done.get(0)
        metric = first.metric if first is not None else None
        name, higher = (first.metric_name, first.higher_is_better) if first is not None \
            else ("accuracy", True)
        main = s.n_masters  # the main worker's rank
        if first is not None and first.metric_follows:  # the main worker scores the model
            req = s.comm.irecv(source=main, tag=T_METRIC)
            deadline = time.monotonic() + NO_DEADLINE_S
            while True:
                ok, metric = req.test()
                if ok:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{me}: no metric from rank {main}")
                time.sleep(0.01)
        extra: dict[str, float] = {}
        if self.shard is not None:  # each shard's own staleness; the run's is the leader's
            per = {0: dict(m.progress.staleness)}
            for k in range(1, s.n_masters):
                per[k], _ = s.comm.recv(source=k, tag=T_SHARD_REPORT)
            for k, st in sorted(per.items()):
                n = sum(st.values())
                extra[f"staleness_mean_shard{k}"] = \
                    sum(a * c for a, c in st.items()) / n if n else 0.0
        result = loop_result(s, self.hp, self.lr0, reports, self.n_params, final,
                             metric, name, higher, extra,
                             staleness=dict(m.progress.staleness), updates=m.progress.version)
        finish_rank0(s, result, reports, quiet=False)
        # the main worker's finish() returns the job's result, as rank 0's does elsewhere
        for r in [*range(1, s.n_masters), main]:
            s.comm.send(result, dest=r, tag=T_RESULT)
        return MasterHandle(result, final)

    def final_model(self) -> Tensor:
        """Collective with every rank: each shard broadcasts its slice of the final model
        (one master: the whole of it); returns the whole model."""
        s, m = self.s, self.m
        if self.shards is None:
            wait(s.comm.Ibcast(m.x, root=0), s, "sending the final model")
            return m.x.clone()
        whole = torch.zeros(self.numel)
        for k, sh in enumerate(self.shards):
            part = sh.of(whole)
            if k == s.rank:
                part.copy_(m.x)
            wait(s.comm.Ibcast(part, root=k), s, f"the final model's slice {k}")
        return whole


def run_master(s: Session) -> MasterHandle:
    """A master rank of a centralized job: agree on the model with the workers, take the
    first worker's as the start, serve until all have finished."""
    ref = s.reference
    sig = agree(s, None, ref)
    x0 = torch.zeros(sig.numel)
    wait(s.comm.Ibcast(x0, root=ref), s, f"the initial model from rank {ref}")
    return LoopMaster(s, sig, x0).serve()
