"""The loop API's optimizer: :class:`DistributedOptimizer`, a ``torch.optim.Optimizer`` whose
``step()`` is the mode's (:mod:`.strategies`)."""

from __future__ import annotations

import atexit
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..config import UNKNOWN_KEY, ConfigError, OptimConfig, ignored_settings
from ..flat import flatten
from ..messages import LoopReport
from ..optim import Optimizer
from .agree import agree, signature
from .base import NOT_LOOP_SETTINGS, PROG, LoopError, score, wait, warn_ignored
from .report import LoopSummary, finish_rank0, loop_result, merged
from .session import crashed, current, reset
from .strategies import Ending, strategy_for
from .wrapped import TorchStep, spec_of


def _edges_digest(graph: Any) -> str | None:
    """A short digest of a graph's edges (None: no graph), for the ranks to compare."""
    if graph is None:
        return None
    import hashlib

    edges = sorted(tuple(sorted((int(a), int(b)))) for a, b in graph.edges())
    return hashlib.sha1(repr(edges).encode()).hexdigest()[:12]


class DistributedOptimizer(torch.optim.Optimizer):
    """The optimizer of one rank in a loop-API job (see the module docstring).

    ``DistributedOptimizer(torch_optimizer, model)`` (or ``DistributedOptimizer(model,
    optimizer=torch_optimizer)``) wraps an optimizer you built, any ``torch.optim``
    class or your own, with its param groups and lr (see :mod:`.wrapped`); otherwise
    the built-in optimizers below are used.

    ``model``: the rank's model, already on :func:`device` and with any weights you load
    already loaded (float32). Its trainable parameters and float buffers are moved into
    one flat buffer (they stay ordinary parameters to your code; do not move the model
    afterwards). ``lr``: a number or a callable ``lr(step)``; ``optimizer`` and the other
    keywords are :class:`~apam_gossip.config.OptimConfig` fields (``amsgrad`` by default;
    ``beta1``, ``beta2``, ``eps``, ``bias_correction``, ``weight_decay``, ``momentum``,
    ``nesterov``); a scheduler that cycles momentum needs ``cycle_momentum=False``.
    ``broadcast=False`` keeps each rank's own initial model (decentralized and
    allreduce; for experiments such as gossip from different starts). Use as a context
    manager to call :meth:`finish` on leaving the block.
    """

    def __init__(self, model: nn.Module | torch.optim.Optimizer,
                 lr: float | Callable[[int], float] | nn.Module | None = None, *,
                 optimizer: str | torch.optim.Optimizer = "amsgrad", broadcast: bool = True,
                 **optim: Any) -> None:
        s = current("DistributedOptimizer(...)", after_finish=False)
        wrapped, model, lr = _unwrap(model, lr, optimizer, optim, s.rank)
        if s.master_done or s.is_master:
            raise LoopError(f"rank {s.rank} is the centralized master: it does not train "
                            "(init() returned its MasterHandle); skip your loop when "
                            "ag.is_master()")
        if s.optimizer is not None:
            raise LoopError(f"rank {s.rank}: one DistributedOptimizer per job; call "
                            "finish() on the first one")
        if not isinstance(model, nn.Module):
            raise LoopError(f"rank {s.rank}: model must be an nn.Module, got "
                            f"{type(model).__name__}")
        for k in NOT_LOOP_SETTINGS:
            if k in optim:
                raise LoopError(f"rank {s.rank}: DistributedOptimizer({k}=...): the loop "
                                "API's learning rate is yours: pass lr as a function of the "
                                "step, or put a torch.optim.lr_scheduler on the optimizer")
        if lr is None:
            lr = wrapped.param_groups[0]["lr"] if wrapped is not None else 1e-3
        self.lr_fn = lr if callable(lr) else None
        lr0 = self._checked_lr(lr(1) if callable(lr) else _plain_lr(lr), s.rank)
        self.wrapped = wrapped
        try:  # lr 0 is allowed here (pure gossip); the config's lr is never read
            self.hp = OptimConfig(name=optimizer if wrapped is None else "amsgrad",
                                  lr=lr0 or 1.0, **optim)
        except ConfigError as e:
            raise LoopError(f"rank {s.rank}: DistributedOptimizer: {_as_keywords(e)}") \
                from None
        ignored = ignored_settings({f"optim.{k}" for k in optim}, [s.mode], self.hp)
        if ignored and s.worker_index == 0:  # the first worker says it
            warn_ignored([f"{k[6:]}={optim[k[6:]]!r} ({why})" for k, why in ignored])
        if s.traits.gossip and s.adaptive_state == "tracked" and (
                self.hp.name != "amsgrad" or wrapped is not None):
            raise LoopError(f"rank {s.rank}: adaptive_state='tracked' needs the built-in "
                            "optimizer='amsgrad'" + (f", not a wrapped {type(wrapped).__name__}"
                                                     if wrapped is not None else ""))
        self.session = s
        self.model = model
        self.broadcast = bool(broadcast)
        self.lr0 = lr0
        params = [p for p in model.parameters() if p.requires_grad]
        self._trained = params
        self.spec = spec_of(wrapped, params, f"rank {s.rank}") if wrapped is not None \
            else None
        super().__init__(params, {"lr": lr0})
        if wrapped is not None:  # one set of groups and state: a scheduler on either works
            self.param_groups, self.state = wrapped.param_groups, wrapped.state
            self.defaults = wrapped.defaults
        self.flat = flatten(model, who=f"rank {s.rank}: the model")
        if self.flat.state.dtype != torch.float32:
            raise LoopError(f"rank {s.rank}: the model is {self.flat.state.dtype}; the loop "
                            "API moves float32 models (model.float())")
        self.opt: Any = Optimizer(self.hp) if wrapped is None else \
            TorchStep(wrapped, self.flat.params, self.flat.grads, self.hp)
        self.steps = 0
        self.stepped = False  # a step() was taken in this job (resume must come first)
        self.version = 0
        self.samples = 0
        self._pending = 0
        self.step_s = 0.0
        self.staleness: Counter[int] = Counter()
        self.averages = self.refused = 0
        self.opt_state: dict[str, Tensor] = {}
        self.finished = False
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        self._dev_cpu = self.flat.state.device.type == "cpu"
        self.host = self.flat.state if self._dev_cpu else torch.zeros(self.flat.numel)
        s.optimizer = self
        self.strategy = strategy_for(self)
        self._start()
        atexit.register(self._finish_at_exit)
        self.t0: float | None = None  # the clock starts at the first step
        self._logged_at = 0.0  # init(log=...): when the last progress line was written

    # -- helpers -----------------------------------------------------------------------
    @staticmethod
    def _checked_lr(value: Any, rank: int) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not 0 <= value <= 1e6 or value != value:
            raise LoopError(f"rank {rank}: lr must be a number in [0, 1e6] (or a function "
                            f"of the step returning one), got {value!r}")
        return float(value)

    def _count(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if first is not None and first.dim():
            self._pending += int(first.shape[0])

    def lr_of(self, step: int) -> float:
        """The lr of update ``step``: the callable's, or what a scheduler left."""
        group = self.param_groups[0]
        if self.lr_fn is not None:
            group["lr"] = self.lr_fn(step)
        group["lr"] = self._checked_lr(group["lr"], self.session.rank)
        return group["lr"]

    def to_host(self) -> Tensor:
        """The flat model in host memory (a copy when the model is on a GPU)."""
        if not self._dev_cpu:
            self.host.copy_(self.flat.state)
        return self.host

    def from_host(self) -> None:
        """The host copy back into the model (a GPU model)."""
        if not self._dev_cpu:
            self.flat.state.copy_(self.host)

    def _gather_grads(self) -> None:
        """Make sure the flat gradient holds every parameter's gradient: a zero_grad that
        set ``.grad = None`` (``model.zero_grad()``) detached them from the buffer. A
        parameter that left the flat state (the model was moved) is an error."""
        if self.flat.check_views():
            return
        lo, size = self.flat.state.data_ptr(), self.flat.state.element_size() * self.flat.numel
        off = 0
        for p in self._trained:  # the flat buffer's order (a wrapped optimizer's groups
            if not lo <= p.data_ptr() < lo + size:  # may hold them in another)
                raise LoopError(f"{self.who}: the model's parameters were moved or replaced "
                                "after DistributedOptimizer was built (model.to(), .cuda(), "
                                "a new tensor): move and load the model first")
            n = p.numel()
            g = self.flat.grads[off: off + n]
            if p.grad is None:
                g.zero_()
            else:
                g.copy_(p.grad.reshape(-1))
            p.grad = g.view_as(p)
            off += n

    @property
    def who(self) -> str:
        return f"rank {self.session.rank}"

    # -- start: agree on the model, then the mode's own start ---------------------------
    def _start(self) -> None:
        s = self.session
        if s.comm is not None:
            setup = {"mode": s.mode, "adaptive_state": s.adaptive_state,
                     "broadcast": self.broadcast, "topology": s.topology,
                     "compress": s.compress, "compress_gamma": s.compress_gamma,
                     # the graph itself (a generator with another seed, or another copy
                     # of a file, builds another one): its edges' digest
                     "topology_edges": _edges_digest(s.graph)}
            ref = s.reference
            agree(s, signature(self.flat, self.hp, setup, self.lr0, self.spec), ref)
            if self.broadcast or s.traits.master:  # (the master owns the model there)
                wait(s.comm.Ibcast(self.to_host(), root=ref), s,
                     f"the initial model from rank {ref}")
                self.from_host()
        self.strategy.start()

    # -- torch.optim.Optimizer --------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients in place (they are views into the flat buffer, which a
        ``None`` would detach; ``set_to_none`` is accepted and ignored)."""
        self._gather_grads()
        self.flat.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of this rank's model with the gradients its last backward left."""
        if self.finished:
            raise LoopError(f"{self.who}: step() after finish()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = time.perf_counter()
        if self.t0 is None:
            self.t0 = time.monotonic()
        self.stepped = True
        self._gather_grads()
        if not math.isfinite(float(self.flat.grads.sum())):  # any NaN/inf entry
            raise LoopError(f"{self.who}: the gradient has non-finite entries at step "
                            f"{self.steps + 1} (try a smaller learning rate)")
        samples, self._pending = self._pending, 0
        self.strategy.step(samples)
        self.steps += 1
        self.samples += samples
        self.step_s += time.perf_counter() - t
        m = self.session.metrics
        if m is not None:  # rank 0 with init(log=...): its throughput every few seconds
            wall = time.monotonic() - self.t0
            if wall - self._logged_at >= m.PROGRESS_EVERY_S:
                self._logged_at = wall
                m.progress(self.samples, wall, {"rank0/samples_per_s": self.samples / wall,
                                                "rank0/steps": float(self.steps)})
        return loss

    # -- the end ------------------------------------------------------------------------
    def finish(self, metric: float | Callable[[nn.Module], float] | None = None,
               metric_name: str = "accuracy", higher_is_better: bool = True,
               average: bool = False, quiet: bool = False) -> LoopSummary:
        """End this rank's loop; collective (every rank calls it, and waits for the
        others however long they still train).

        Centralized workers end with the master's final model; ``average``
        (decentralized; every rank must pass the same) sets every rank's model to the
        average of all. ``metric``: the score of the run, recorded in the result under
        ``metric_name``: a number you measured, or a function ``metric(model)`` called on
        the final model (so after the master's model arrived, or after the average) -- by
        rank 0, or in centralized mode by the first worker (rank 1). Rank 0 prints a
        per-rank summary (unless ``quiet``) and writes ``init(result=...)``. The main
        worker (:func:`is_main_worker`) gets the job's RunResult in the returned summary's
        ``result`` in every mode (centralized: sent by the master).
        """
        if self.finished:
            raise LoopError(f"{self.who}: finish() was called twice")
        self.finished = True
        self._hook.remove()
        atexit.unregister(self._finish_at_exit)
        s = self.session
        try:
            self.strategy.before_end()
            wall = time.monotonic() - self.t0 if self.t0 is not None else 0.0
            pick = getattr(self.strategy, "pick", None)  # (gossip's neighbour picker)
            rep = LoopReport(s.rank, str(self.flat.state.device), self.steps, self.samples,
                             wall, self.step_s, self.averages, self.refused,
                             dict(self.staleness),
                             dict(pick.counts) if pick is not None else None)
            ended = self.strategy.end(rep, Ending(metric, metric_name, higher_is_better,
                                                  average))
            if ended is None or s.rank != 0:
                return LoopSummary(s.rank, [rep], self.strategy.result)
            reports, extra, final = ended
            assert reports is not None
            if callable(metric):
                metric = score(metric, self.model, self.who)
            result = loop_result(s, self.hp, self.lr0, reports, self.flat.n_params, final,
                                 metric, metric_name, higher_is_better, extra,
                                 staleness=merged(reports),
                                 updates=sum(r.steps for r in reports))
            finish_rank0(s, result, reports, quiet)
            return LoopSummary(s.rank, reports, result)
        finally:
            s.optimizer = None
            reset(keep=True)  # the queries and ag.allreduce still answer

    def _finish_at_exit(self) -> None:
        """A script that ends without ``finish()`` would leave the other ranks waiting:
        finish for it (the other ranks' ``finish()`` is collective). Not after a crash:
        then the job ends (under MPI the exception hook aborted it already)."""
        if self.finished or crashed():
            return
        from ..runlog import warn

        warn(f"{self.who} ended without opt.finish(); finishing now")
        try:
            self.finish()
        except BaseException as e:  # noqa: BLE001 - at exit nobody else would see it
            print(f"{PROG}: error: {self.who}: finishing at exit failed: "
                  f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if self.session.comm is not None:
                self.session.comm.Abort(1)

    def __enter__(self) -> DistributedOptimizer:
        return self

    def __exit__(self, tp, e, tb) -> None:
        if e is None and not self.finished:
            self.finish()

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What resuming this rank needs: the model state, the optimizer state and the
        counters (centralized: the master's model, state and update count)."""
        if self.finished:
            raise LoopError(f"{self.who}: state_dict() after finish(): take it before")
        s = self.session
        d: dict[str, Any] = {"apam_gossip_loop": 1, "mode": s.mode, "rank": s.rank,
                             "size": s.size, "steps": self.steps,
                             "lr": self.param_groups[0]["lr"], "optimizer": self.optimizer_name}
        if s.traits.gossip:
            d["adaptive_state"] = s.adaptive_state
        d.update(self.strategy.state())
        return d

    @property
    def optimizer_name(self) -> str:
        """The built-in optimizer's name, or the wrapped optimizer's class."""
        return self.hp.name if self.spec is None else self.spec.name

    def _check_state(self, d: Any) -> dict[str, Any]:
        s = self.session
        if not isinstance(d, dict) or d.get("apam_gossip_loop") != 1:
            raise LoopError(f"{self.who}: load_state_dict: not a DistributedOptimizer "
                            "state_dict")
        if d["mode"] != s.mode:
            raise LoopError(f"{self.who}: load_state_dict: the state is of mode "
                            f"{d['mode']!r}, this job's is {s.mode!r}")
        if d.get("optimizer") != self.optimizer_name:
            raise LoopError(f"{self.who}: load_state_dict: the state is of optimizer "
                            f"{d.get('optimizer')!r}, this one is {self.optimizer_name!r}")
        if not isinstance(d.get("x"), Tensor) or d["x"].numel() != self.flat.numel:
            raise LoopError(f"{self.who}: load_state_dict: the state's model does not match "
                            f"this one ({self.flat.numel} entries)")
        if s.traits.gossip:
            theirs = d.get("adaptive_state", "tracked" if "u" in d else "local")
            if theirs != s.adaptive_state:  # a tracked job from a local state collapses
                raise LoopError(f"{self.who}: load_state_dict: the state is of "
                                f"adaptive_state {theirs!r}, this job's is "
                                f"{s.adaptive_state!r}: resume with init(adaptive_state="
                                f"{theirs!r}), or start afresh")
        if s.traits.gossip and (d["rank"], d["size"]) != (s.rank, s.size):
            raise LoopError(f"{self.who}: load_state_dict: the state is rank {d['rank']} of "
                            f"{d['size']}; load each rank's own state into the same ranks")
        if self.stepped:
            raise LoopError(f"{self.who}: load_state_dict() after training started: load "
                            "before the first step()")
        want = set(self.opt.init(torch.zeros(1)))
        if self.spec is None and set(d["opt"]) != want:
            raise LoopError(f"{self.who}: load_state_dict: the optimizer state has "
                            f"{sorted(d['opt'])}, this optimizer needs {sorted(want)}")
        if self.spec is not None and not isinstance(d.get("state"), dict):
            raise LoopError(f"{self.who}: load_state_dict: the state has no wrapped "
                            "optimizer's state ('state', 'param_groups')")
        return {**d, "x": d["x"].detach().cpu(),
                "opt": {k: v.detach().cpu() for k, v in d["opt"].items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`, before the first step; collective. Centralized:
        every worker loads (the same state: the master's), and the master resumes from it
        once all have. Decentralized: every rank loads its own state (same ranks, same
        number). Resuming reproduces the uninterrupted run where the run is deterministic
        (one worker, allreduce); gossip resumes every model and optimizer state, but the
        order of later averages is random anyway."""
        d = self._check_state(state_dict)
        self.steps = int(d["steps"])
        if self.spec is None:
            self.param_groups[0]["lr"] = d["lr"]
        self.strategy.load(d)


def _plain_lr(lr: Any) -> Any:
    """A tensor lr (torch optimizers accept one) as its number."""
    return float(lr) if isinstance(lr, Tensor) and lr.numel() == 1 else lr


def _unwrap(model: Any, lr: Any, optimizer: Any, optim: dict[str, Any],
            rank: int) -> tuple[torch.optim.Optimizer | None, Any, Any]:
    """(the wrapped torch optimizer or None, the model, the lr) of the two ways to call:
    ``(model, lr, optimizer="amsgrad", ...)`` and ``(torch_optimizer, model)`` (or
    ``(model, optimizer=torch_optimizer)``)."""
    wrapped = None
    if isinstance(model, torch.optim.Optimizer):
        wrapped = model
        model = lr if isinstance(lr, nn.Module) else optim.pop("model", None)
        lr = None
        if model is None:
            raise LoopError(f"rank {rank}: DistributedOptimizer({type(wrapped).__name__}"
                            "(...), model): give the model too (its parameters and "
                            "buffers are what the ranks exchange)")
    elif isinstance(optimizer, torch.optim.Optimizer):
        wrapped = optimizer
    if wrapped is None:
        return None, model, lr
    if isinstance(wrapped, DistributedOptimizer):
        raise LoopError(f"rank {rank}: the optimizer is a DistributedOptimizer already")
    if lr is not None:
        raise LoopError(f"rank {rank}: DistributedOptimizer(lr=...) with a wrapped "
                        f"{type(wrapped).__name__}: its lr is its param groups' (set it "
                        "there, or put a torch.optim.lr_scheduler on either optimizer)")
    if optim:
        k = sorted(optim)[0]
        raise LoopError(f"rank {rank}: DistributedOptimizer({k}=...) with a wrapped "
                        f"{type(wrapped).__name__}: its hyper-parameters are its own (set "
                        "them where you build it)")
    return wrapped, model, lr


def _as_keywords(e: ConfigError) -> str:
    """A config error in the words of DistributedOptimizer's keywords: the optimizer's
    ``name`` is the ``optimizer=`` keyword, and keys are keyword arguments."""
    def kw(key: str | None) -> str:
        key = (key or "").removeprefix("optim.")
        return "optimizer" if key == "name" else key

    if e.key is None or e.problem is None:
        return str(e)
    if e.problem.startswith(UNKNOWN_KEY):
        rest = e.problem[len(UNKNOWN_KEY):].replace("valid keys:", "valid keywords:")
        rest = re.sub(r"\bname\b", "optimizer", rest)
        return f"unexpected keyword argument {kw(e.key)!r}{rest}"
    return f"{kw(e.key)} {e.problem}"
