"""Rank 0 of a centralized loop-API job: the APAM master's rule
(:class:`~apam_gossip.core.apam.ApamCore`) served to the workers' own loops."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..config import OptimConfig
from ..core.apam import ApamCore
from ..flat import flatten
from ..messages import Done, Grad, Hello, LoopFault, LoopState, Params, StateRequest, Stop
from ..result import RunResult
from .agree import Signature, agree
from .base import NO_DEADLINE_S, T_METRIC, T_RESULT, LoopError, Session, wait
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


class LoopMaster:
    """Rank 0 of a centralized loop-API job: the APAM master's rule
    (:class:`~apam_gossip.core.apam.ApamCore`) driven by the workers' loops instead of a
    budget: each gradient brings its worker's lr, and it serves until every worker has
    finished."""

    def __init__(self, s: Session, sig: Signature, x0: Tensor) -> None:
        from ..transport.mpi import MpiStarMaster

        self.s = s
        self.lr0 = sig.lr0
        self.end = MpiStarMaster(s.comm, sig.numel, timeout=s.timeout_s, pin=False)
        self.hp = OptimConfig(**dict(sig.optim), lr=sig.lr0 or 1.0)
        self.n = self.end.n_workers
        self.m = ApamCore(x0, self.hp, self.n, n_params=sig.n_params)
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

    def on_load(self, i: int, st: LoopState) -> None:
        """A worker's load_state_dict: resume once every live worker has loaded."""
        m = self.m
        if self.applied:
            self.fault(i, f"rank {i + 1}: load_state_dict() after training started: every "
                       "worker loads before its first step()")
            return
        if self.done:
            self.fault(i, f"rank {i + 1}: load_state_dict() after rank {min(self.done) + 1} "
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
                    self.fault(k, f"rank {j + 1}: load_state_dict: its state (update "
                               f"{other.version}) is not rank {min(self.loading) + 1}'s "
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

    def serve(self) -> MasterHandle:
        m, end, s = self.m, self.end, self.s
        waiting = set(range(self.n))
        deadline = time.monotonic() + s.timeout_s
        while waiting:  # every worker has its model (a rank that dies ends the job)
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 (master): workers {sorted(waiting)} did not "
                                   f"start within timeout_s={s.timeout_s:g} s")
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
                msg, grad = end.recv(i)
                if isinstance(msg, Grad):
                    if self.loading:
                        self.fault(i, f"rank {i + 1}: step() while other workers load a "
                                   "checkpoint: every worker loads before its first step()")
                        continue
                    m.apply(i, grad, msg.version, msg.samples, msg.lr)
                    self.applied = True
                    end.send(i, m.model_for_workers(), Params(m.version))
                elif isinstance(msg, Done):
                    self.done[i] = msg
                    # the loading workers wait for every live worker to load: one that
                    # finished instead never will (misuse: one line, not a hang)
                    for k in sorted(self.loading):
                        self.fault(k, f"rank {k + 1}: load_state_dict() while rank {i + 1} "
                                   "finished without loading: every worker loads the same "
                                   "state before its first step(), or none does")
                    self.loading.clear()
                elif isinstance(msg, StateRequest):
                    assert m.state is not None
                    if self.torch_step is not None:
                        from .wrapped import to_bytes

                        opt = {"torch": to_bytes(self.torch_step.torch.state_dict())}
                    else:
                        opt = {k: v.numpy().copy() for k, v in m.state.items()}
                    end.send(i, None, LoopState(m.x.numpy().copy(), opt, m.version))
                elif isinstance(msg, LoopState):
                    self.on_load(i, msg)
                else:
                    raise AssertionError(f"unexpected message from rank {i + 1}: {msg!r}")
        for i in sorted(self.done):
            end.send(i, None, Stop())
        wait(s.comm.Ibcast(m.x, root=0), s, "sending the final model")
        reports = [self.done[i].report for i in sorted(self.done)]
        first = self.done.get(0)
        metric = first.metric if first is not None else None
        name, higher = (first.metric_name, first.higher_is_better) if first is not None \
            else ("accuracy", True)
        if first is not None and first.metric_follows:  # rank 1 scores the final model
            req = s.comm.irecv(source=1, tag=T_METRIC)
            deadline = time.monotonic() + NO_DEADLINE_S
            while True:
                ok, metric = req.test()
                if ok:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("rank 0 (master): no metric from rank 1")
                time.sleep(0.01)
        result = loop_result(s, self.hp, self.lr0, reports, m.n_params, m.x, metric, name,
                             higher, {}, staleness=dict(m.progress.staleness),
                             updates=m.progress.version)
        finish_rank0(s, result, reports, quiet=False)
        # the main worker's finish() returns the job's result, as rank 0's does elsewhere
        s.comm.send(result, dest=1, tag=T_RESULT)
        return MasterHandle(result, m.x.clone())


def run_master(s: Session) -> MasterHandle:
    """Rank 0 of a centralized job: agree on the model with the workers, take rank 1's
    as the start, serve until all have finished."""
    sig = agree(s, None, 1)
    x0 = torch.zeros(sig.numel)
    wait(s.comm.Ibcast(x0, root=1), s, "the initial model from rank 1")
    return LoopMaster(s, sig, x0).serve()
