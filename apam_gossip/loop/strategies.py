"""One small step strategy per mode, behind :class:`~apam_gossip.loop.DistributedOptimizer`
(chosen once, by :func:`strategy_for`, as Horovod picks its optimizer class):

* :class:`Local`: no launcher, one process: the plain optimizer step;
* :class:`CentralizedWorker`: a worker rank of APAM: send ``[grads | buffers]`` with this
  rank's lr, load the model the master sends back;
* :class:`Gossip`: a rank of AD-PSGD: average with a random neighbor (in a second thread
  beside your next gradient, with ``overlap``), then the local step of
  :class:`~apam_gossip.core.gossip.GossipRule`;
* :class:`Allreduce`: all-reduce ``[grads | buffers | active | lr]``, then every rank takes
  :func:`~apam_gossip.core.sync.allreduce_step`.

Each says what ``start`` (after the model is agreed and broadcast), ``step``, ``end`` (at
``finish()``), ``state`` (``state_dict()``) and ``load`` (``load_state_dict()``) do; the
facade keeps everything the modes share (lr, counters, the hook that counts samples).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..algorithms.adpsgd import average_with_a_neighbor, neighbor_picker, on_stream
from ..algorithms.common import worker_seed
from ..core.compress import gamma_for, parse_compress
from ..core.consensus import consensus_from_sums, squares
from ..core.gossip import GossipRule
from ..core.sync import allreduce_step
from ..messages import (
    Done,
    Grad,
    Hello,
    LoopFault,
    LoopReport,
    LoopState,
    Params,
    StateAt,
    StateCounts,
    StateRequest,
    Stop,
)
from ..topology import neighbor_probabilities
from .base import NO_DEADLINE_S, T_METRIC, T_RESULT, LoopError, Session, score, wait
from .torchcomm import iallreduce
from .wrapped import from_bytes, to_bytes


@dataclass
class Ending:
    """``finish()``'s arguments."""

    metric: Any
    metric_name: str
    higher_is_better: bool
    average: bool


# (reports on rank 0, extra metrics, the final model), or None: this rank reports nothing
Ended = tuple[list[LoopReport] | None, dict[str, float], Tensor] | None


class Strategy:
    """The modes' common interface (the base is the one-process behaviour)."""

    result: Any = None  # the job's RunResult where a strategy receives it (APAM's worker)

    def __init__(self, opt: Any) -> None:  # the DistributedOptimizer (it imports this)
        self.opt = opt
        self.s: Session = opt.session

    def start(self) -> None:
        o = self.opt
        o.opt_state = o.opt.init(o.flat.params)

    def step(self, samples: int) -> None:
        o = self.opt
        o.opt.update(o.flat.params, o.flat.grads, o.opt_state, lr=o.lr_of(o.steps + 1))

    def before_end(self) -> None:
        """``finish()`` begins: settle anything in flight before this rank's report."""

    def end(self, rep: LoopReport, how: Ending) -> Ended:
        return [rep], {}, self.opt.flat.state.detach().cpu()

    def state(self) -> dict[str, Any]:
        o = self.opt
        return {"x": o.flat.state.detach().cpu().clone(),
                "opt": {k: v.detach().cpu().clone() for k, v in o.opt_state.items()},
                "version": o.steps, **wrapped_state(o)}

    def load(self, d: dict[str, Any]) -> None:
        o = self.opt
        o.opt_state = {k: v.clone().to(o.opt_state[k].device) for k, v in d["opt"].items()}
        o.flat.state.copy_(d["x"])
        load_wrapped(o, d)


def wrapped_state(o: Any) -> dict[str, Any]:
    """A wrapped optimizer's state_dict, in torch's format ('state', 'param_groups'), so
    the whole dict also loads into the plain torch optimizer."""
    return o.wrapped.state_dict() if o.wrapped is not None else {}


def load_wrapped(o: Any, d: dict[str, Any]) -> None:
    if o.wrapped is not None:
        o.wrapped.load_state_dict({"state": d["state"], "param_groups": d["param_groups"]})
        # torch's load_state_dict makes new groups and state: share them again, so a
        # scheduler on the wrapper sees the loaded lrs
        o.param_groups, o.state = o.wrapped.param_groups, o.wrapped.state


Local = Strategy


class CentralizedWorker(Strategy):
    """A worker rank: the master (rank 0, or its K shards on ranks 0..K-1) owns the model
    and optimizer state."""

    def start(self) -> None:
        from ..transport.mpi import MpiStarWorker

        o, s = self.opt, self.s
        k = s.n_masters
        if k == 1:
            self.end_: Any = MpiStarWorker(s.comm, o.flat.numel)
            self.ends = [self.end_]
            self.shards = None
        else:  # one end per shard, joined into one star end for the gradients
            from ..core.apam import shards_of
            from ..transport.sharded import ShardedWorkerEnd

            self.shards = shards_of(o.flat.numel, o.flat.n_params, k)
            self.ends = [MpiStarWorker(s.comm, sh.numel, master=j, first_worker=k)
                         for j, sh in enumerate(self.shards)]
            self.end_ = ShardedWorkerEnd(self.ends, self.shards)
        self.end_.send(None, Hello(s.worker_index))
        msg = self.end_.recv(o.flat.state, s.timeout_s)
        assert isinstance(msg, Params), msg
        o.version = msg.version

    def step(self, samples: int) -> None:
        o = self.opt
        self.end_.send(o.flat.pack_grad_msg(), Grad(o.version, samples, float("nan"), 0.0,
                                                     o.lr_of(o.version + 1)))
        backs = self._each(o.flat.state, self.s.timeout_s)
        for k, back in enumerate(backs):
            if not isinstance(back, Params):
                raise RuntimeError(f"{o.who}: the master answered {back!r} to a gradient")
            if self.shards is not None:  # each shard's version, for its staleness
                self.end_.versions[k] = back.version
        o.version = backs[0].version

    def _each(self, out: Tensor | None, timeout: float) -> list[Any]:
        """Every shard's answer (one master's: its one), slice ``k`` of ``out`` (a model
        reply's) in place, taken as they arrive
        (:func:`~apam_gossip.transport.mpi.recv_from_each`); a fault of any raised after
        all have answered (each shard's answer must be taken)."""
        if self.shards is None:
            got = [self.end_.recv(out, timeout)]
        else:
            from ..transport.mpi import recv_from_each

            outs = [None if out is None else sh.of(out) for sh in self.shards]
            got = recv_from_each(self.ends, outs, timeout,
                                 f"{self.opt.who}: the master's shards' answers")
        for msg in got:
            if isinstance(msg, LoopFault):
                raise LoopError(msg.message)
        return got

    def end(self, rep: LoopReport, how: Ending) -> Ended:
        """Report to the master, wait for every worker, take the master's final model;
        the first worker (rank 1; the rank after the shards) scores it when the metric
        is a function."""
        o, s = self.opt, self.s
        first = s.worker_index == 0
        later = first and callable(how.metric)
        done = Done(rep, how.metric if first and not later else None, later,
                    how.metric_name, how.higher_is_better)
        for end in self.ends:
            end.send(None, done)
        for msg in self._each(None, NO_DEADLINE_S):  # until every worker is done
            assert isinstance(msg, Stop), msg
        host = o.to_host()
        if self.shards is None:
            wait(s.comm.Ibcast(host, root=0), s, "the final model from the master")
        else:
            for k, sh in enumerate(self.shards):
                wait(s.comm.Ibcast(sh.of(host), root=k), s,
                     f"the final model's slice {k} from the master")
        o.from_host()
        if later:
            s.comm.send(score(how.metric, o.model, o.who), dest=0, tag=T_METRIC)
        if first:  # the main worker: the job's result, from the master (a blocking recv
            # probes the size: irecv's default buffer is too small for a whole result)
            self.result = s.comm.recv(source=0, tag=T_RESULT)
        return None

    def _state(self) -> LoopState:
        """The master's state; a sharded master's as one consistent cut (see
        :mod:`apam_gossip.loop.master`), joined."""
        if self.shards is None:
            self.end_.send(None, StateRequest())
            st = self.end_.recv(None, self.s.timeout_s)
            assert isinstance(st, LoopState), st
            return st
        from ..core.apam import join_states
        from ..transport.mpi import recv_from_each

        # shard 0 first, and the others once it has answered: the cuts' one order (see
        # apam_gossip.loop.master); shard 0 answers when the cut before has ended
        self.ends[0].send(None, StateRequest())
        counts = [self.ends[0].recv(None, self.s.timeout_s)]
        for end in self.ends[1:]:
            end.send(None, StateRequest())
        counts += recv_from_each(self.ends[1:], [None] * (len(self.ends) - 1),
                                 self.s.timeout_s, f"{self.opt.who}: the shards' counts")
        assert all(isinstance(c, StateCounts) for c in counts), counts
        target = tuple(max(c) for c in zip(*(m.counts for m in counts), strict=True))
        for end in self.ends:
            end.send(None, StateAt(target))
        parts = self._each(None, self.s.timeout_s)
        # one cut: every shard at the same gradients (so at the same version too)
        assert all(isinstance(p, LoopState) and p.counts == target for p in parts), \
            (target, [getattr(p, "counts", p) for p in parts])
        assert len({p.version for p in parts}) == 1, [p.version for p in parts]
        opt = join_states([{k: torch.from_numpy(v) for k, v in p.opt.items()}
                           for p in parts])
        return LoopState(np.concatenate([p.x for p in parts]),
                         {k: v.numpy() for k, v in opt.items()}, parts[0].version)

    def state(self) -> dict[str, Any]:
        st = self._state()
        if self.opt.wrapped is not None:  # the master's copy of your optimizer holds it
            sd = from_bytes(st.opt["torch"])
            for mine, theirs in zip(self.opt.param_groups, sd["param_groups"], strict=True):
                theirs["lr"] = mine["lr"]  # your scheduler's lr (the master scales by it)
            return {"x": torch.from_numpy(st.x), "version": st.version, "opt": {}, **sd}
        return {"x": torch.from_numpy(st.x), "version": st.version,
                "opt": {k: torch.from_numpy(v) for k, v in st.opt.items()}}

    def load(self, d: dict[str, Any]) -> None:
        """Every worker sends the state to the master (each shard its slice), which
        resumes once all have."""
        o = self.opt
        load_wrapped(o, d)  # this worker's own lrs (its scheduler's) come back too
        if o.wrapped is not None:
            msgs = [LoopState(d["x"].numpy(), {"torch": to_bytes(
                {"state": d["state"], "param_groups": d["param_groups"]})},
                int(d["version"]))]
        elif self.shards is None:
            msgs = [LoopState(d["x"].numpy(), {k: v.numpy() for k, v in d["opt"].items()},
                              int(d["version"]))]
        else:
            msgs = [LoopState(sh.of(d["x"]).numpy(),
                              {k: v.numpy() for k, v in sh.state_of(d["opt"]).items()},
                              int(d["version"])) for sh in self.shards]
        for end, msg in zip(self.ends, msgs, strict=True):
            end.send(None, msg)
        backs = self._each(o.flat.state, NO_DEADLINE_S)  # until all have loaded
        assert all(isinstance(b, Params) for b in backs), backs
        if self.shards is not None:  # each shard's version: the next gradient's staleness
            self.end_.versions[:] = [b.version for b in backs]
        o.version = backs[0].version


class Gossip(Strategy):
    """A rank of decentralized gossip over MPI."""

    def start(self) -> None:
        from ..transport.mpi import MpiGossip

        o, s = self.opt, self.s
        tracked = s.adaptive_state == "tracked"
        # the gossip state where your model is (its GPU: the local step runs there, and
        # exchanges go through pinned host buffers)
        dev = o.flat.state.device
        nb, probs = neighbor_probabilities(s.graph)[s.rank]
        comp = parse_compress(s.compress)
        self.gossip = MpiGossip(s.comm, o.flat.state, tracked, 0, s.timeout_s,
                                n_tracked=o.flat.n_params, device=dev, compress=comp,
                                gamma=gamma_for(comp, s.compress_gamma), neighbors=nb)
        if not o.broadcast:  # each rank its own start: copies every rank agrees on
            self.gossip.zero_public()
        self.rule = GossipRule(o.hp, s.size, o.flat.n_params, tracked)
        if o.wrapped is not None:  # the local step is your optimizer's
            self.rule.opt = o.opt
        o.opt_state = self.rule.init_state(dev)
        self.pick = neighbor_picker(nb, probs, worker_seed(s.seed, s.rank) + 1,
                                    choice=s.neighbour_choice) if nb else None
        self.buffers0 = o.flat.buffers.clone()
        self.v0 = self.gossip.version
        # the next average runs beside your next gradient (a second thread)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="gossip-average") \
            if s.overlap else None
        # ... on its own CUDA stream on a GPU: on the default stream its copies would
        # queue behind your forward and backward kernels, and the overlap would be lost
        stream = torch.cuda.Stream(dev) if self.thread is not None and dev.type == "cuda" \
            else None
        self.beside = on_stream(self._average, stream)
        self.in_flight: Future | None = None
        wait(s.comm.Ibarrier(), s, "every rank's gossip server to start")

    def step(self, samples: int) -> None:
        o, rule = self.opt, self.rule
        g = o.flat.grads  # on the gossip state's device: the model's
        delta = rule.buffer_delta(o.flat.buffers, self.buffers0, self.gossip.device)
        lr = rule.lr(o.lr_of(o.steps + 1))
        averaged = self._join() if self.in_flight is not None else self._average()
        v1 = self.gossip.update_local(rule.step(g, o.opt_state, lr, delta))
        o.staleness[rule.staleness(self.v0, v1, averaged)] += 1
        self._refresh()
        if self.thread is not None:
            self.in_flight = self.thread.submit(self.beside)

    def _average(self) -> bool:
        """One average with a random neighbor (a refusal is retried with another)."""
        averaged, refusals = average_with_a_neighbor(self.gossip, self.pick)
        self.opt.averages += averaged
        self.opt.refused += refusals
        return averaged

    def _join(self) -> bool:
        """Wait for the average started at the last step (its error is raised here)."""
        fut, self.in_flight = self.in_flight, None
        return fut.result() if fut is not None else False

    def _refresh(self) -> None:
        """The next gradient is computed at a snapshot of x_i (averages keep arriving)."""
        o = self.opt
        self.v0 = self.gossip.snapshot(o.flat.state)  # device to device on a GPU
        if o.flat.n_buffers:
            self.buffers0.copy_(o.flat.buffers)

    def before_end(self) -> None:
        """The last average started: wait for it (no local step follows)."""
        if self.thread is not None:
            try:
                self._join()
            finally:
                self.thread.shutdown()

    def end(self, rep: LoopReport, how: Ending) -> Ended:
        """Gather the reports, check that every rank chose the same ``average``, and
        measure consensus (and average, if asked) with all-reduces, without gathering
        every model anywhere."""
        o, s = self.opt, self.s
        self.gossip.finish(timeout=NO_DEADLINE_S)
        self._refresh()
        comm = s.comm
        reports = comm.gather((rep, bool(how.average)), root=0)
        verdict = None
        if s.rank == 0 and len({a for _, a in reports}) > 1:
            odd = next(r for r, (_, a) in enumerate(reports) if a != bool(how.average))
            verdict = (f"rank {odd}: finish(average={not how.average}) but rank 0 has "
                       f"average={how.average}: every rank must pass the same")
        verdict = comm.bcast(verdict, root=0)
        if verdict is not None:
            raise LoopError(verdict, collective=True)
        n_params = o.flat.n_params
        x = self.gossip.x.to("cpu")  # MPI reduces host memory
        total = x.to(torch.float64, copy=True)  # the all-reduce is in place
        wait(iallreduce(comm, total), s, "averaging the models",
             NO_DEADLINE_S)
        sq = squares(x, n_params)
        wait(iallreduce(comm, sq), s, "the consensus distance",
             NO_DEADLINE_S)
        xbar, extra = consensus_from_sums(total, float(sq[0]), float(sq[1]), s.size,
                                          n_params)
        xbar = xbar.float()
        if how.average:
            o.host.copy_(xbar)
            o.from_host()
        if s.rank != 0:
            return None, extra, xbar
        reports = [r for r, _ in reports]
        extra["averages"] = float(sum(r.averages for r in reports))
        extra["refused_averages"] = float(sum(r.refused_averages for r in reports))
        comp = self.gossip.compress  # what one average put on the wire, both ways
        extra["bytes_per_average"] = float(
            2 * comp.nbytes(x.numel()) if comp is not None else 8 * self.gossip.state.numel())
        return reports, extra, xbar

    def state(self) -> dict[str, Any]:
        o = self.opt
        with self.gossip.lock:  # the gossip state is the model (averages land there)
            d = {"x": self.gossip.x.to("cpu", copy=True)}
            if self.gossip.u is not None:
                d["u"] = self.gossip.u.to("cpu", copy=True)
        d["opt"] = {k: v.detach().cpu().clone() for k, v in o.opt_state.items()}
        d["version"] = o.steps
        d.update(wrapped_state(o))
        return d

    def load(self, d: dict[str, Any]) -> None:
        o, s = self.opt, self.s
        o.opt_state = {k: v.clone().to(o.opt_state[k].device) for k, v in d["opt"].items()}
        with self.gossip.lock:
            self.gossip.x.copy_(d["x"])
            if self.gossip.u is not None and "u" in d:
                self.gossip.u.copy_(d["u"])
            # compressed: every rank loads, so every edge's copies restart at zero alike
            # (no messages; the models' sum is kept from any common start)
            self.gossip.zero_public()
        load_wrapped(o, d)
        self._refresh()
        # nobody averages before every rank has its state back
        wait(s.comm.Ibarrier(), s, "every rank to load its state", NO_DEADLINE_S)


class Allreduce(Strategy):
    """A rank of the synchronous all-reduce baseline over MPI."""

    def start(self) -> None:
        super().start()
        self.red = torch.zeros(self.opt.flat.numel + 2)  # [grads | buffers | active | lr]

    def step(self, samples: int) -> None:
        self._exchange(active=True)

    def _exchange(self, active: bool) -> bool:
        """One all-reduce of ``[grads | buffers | 1 | lr]`` (``active``) or of zeros (a
        rank that finished: it still takes the step, so every replica stays the same);
        returns False once no rank is active any more. Every rank steps with the mean lr
        of the active ranks (they agree, being at the same step of the same schedule), so
        a rank that finished early follows the schedule too instead of keeping its last
        lr. No deadline: the other ranks may be busy with anything between their steps (an
        evaluation); a dead rank ends the job."""
        o, s, red, n = self.opt, self.s, self.red, self.opt.flat.numel
        if active:
            red[:n].copy_(o.flat.pack_grad_msg())
            red[n] = 1.0
            red[n + 1] = o.lr_of(o.steps + 1)
        else:
            red.zero_()
        wait(iallreduce(s.comm, red), s, "the all-reduce",
             NO_DEADLINE_S)
        k = float(red[n])
        if k == 0:
            return False
        lr = float(red[n + 1]) / k  # the same number on every rank (to float32's 1e-7)
        mean = red[:n].div_(k).to(o.flat.state.device)
        allreduce_step(o.opt, o.flat.params, o.flat.buffers, mean, o.opt_state, lr)
        return True

    def end(self, rep: LoopReport, how: Ending) -> Ended:
        while self._exchange(active=False):  # join the others' remaining steps
            pass
        return self.s.comm.gather(rep, root=0), {}, self.opt.flat.state.detach().cpu()


def strategy_for(opt: Any) -> Strategy:
    """The mode's strategy: chosen once, here."""
    s = opt.session
    if s.comm is None:
        return Local(opt)
    return {"centralized": CentralizedWorker, "decentralized": Gossip,
            "allreduce": Allreduce}[s.mode](opt)
