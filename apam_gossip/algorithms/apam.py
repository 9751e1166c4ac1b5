"""Centralized APAM: asynchronous AMSGrad with one master and N workers.

Master (owns x and the optimizer state; the only writer of x, so no Hogwild races)::

    loop k = 1, 2, ...:
        take the gradient g of ANY worker whose message has arrived (first come, first served)
        x <- optimizer step(x, g)            # AMSGrad by default, see apam_gossip.optim
        send the new x to THAT worker only

Worker: receive x -> one mini-batch gradient at x -> send it back -> repeat.

A gradient computed at the model of version ``v`` and applied when the master is at
version ``k`` has staleness ``k - v``; every update's staleness is recorded. A slow
worker only delays its own gradients: the master serves whoever is ready.

A worker whose process dies (SIGKILL, OOM) is dropped: its connection reports
:class:`~apam_gossip.transport.PeerGone`, the master stops waiting for it and finishes the
budget with the others (an exception *raised* in a worker still fails the run).

The master begins the clock once every worker has said hello (data loaded, model
built), so process start-up is not counted as training time. It stops after the
budgeted number of updates. Gradients still being computed then are awaited and dropped
before each worker is told to stop, so a slow worker finishing last ends cleanly.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import save_checkpoint
from ..config import OptimConfig, RunConfig
from ..emulation import MASTER, LinkModel
from ..messages import (
    Grad,
    Hello,
    Interrupted,
    MasterSummary,
    Params,
    Progress,
    Snapshot,
    Stop,
    StopRequest,
)
from ..optim import Optimizer, for_async_master, lookahead_point, staleness_scale
from ..task import Task
from ..transport import Control, MasterEnd, PeerGone, WorkerEnd
from .common import Diverged, LocalWorker

HELLO_TIMEOUT_S = 300.0
PROGRESS_EVERY_S = 0.25


@dataclass
class MasterProgress:
    """What the master has done so far: everything a checkpoint carries besides x and the
    optimizer state (``wall_before``: training seconds of the runs this one resumes)."""

    version: int
    samples: int
    staleness: Counter[int]
    updates_of: list[int]
    samples_of: list[int]
    wall_before: float = 0.0

    @classmethod
    def fresh(cls, n_workers: int) -> MasterProgress:
        return cls(0, 0, Counter(), [0] * n_workers, [0] * n_workers)

    @classmethod
    def from_checkpoint(cls, ck: dict[str, Any], n_workers: int) -> MasterProgress:
        """The progress a checkpoint saved, continued by ``n_workers`` workers: the
        master's state does not depend on how many there are, so a run may resume with
        more (under mpirun, ``-n`` decides); the per-worker counts of workers that are no
        longer there stay in the totals."""
        pad = [0] * max(0, n_workers - len(ck["updates_of"]))
        return cls(int(ck["version"]), int(ck["samples"]),
                   Counter({int(k): int(v) for k, v in ck["staleness"].items()}),
                   [int(v) for v in ck["updates_of"]] + pad,
                   [int(v) for v in ck["samples_of"]] + pad, float(ck["wall_time"]))

    def record(self, worker: int, v_from: int, n_samples: int) -> None:
        """Count one applied gradient of ``worker`` computed at version ``v_from``."""
        self.staleness[self.version - v_from] += 1
        self.version += 1
        self.samples += n_samples
        self.updates_of[worker] += 1
        self.samples_of[worker] += n_samples


@dataclass(frozen=True)
class CheckpointSpec:
    """Where and how often the master checkpoints; ``config`` and ``resumes`` go into
    every checkpoint (see :mod:`apam_gossip.checkpoint`)."""

    path: str
    every_s: float
    config: dict[str, Any]
    resumes: int


class ApamMaster:
    """The master's loop (see the module docstring), in named steps: :meth:`hello`,
    :meth:`apply`, :meth:`snapshot`, :meth:`save`, :meth:`stop_workers`; :meth:`run`
    strings them together.

    ``snaps[j]`` receives the model at the j-th evaluation point (``eval_at[j]``
    updates) and, last, the final model; each is announced with a :class:`Snapshot`.
    A :class:`StopRequest` from the coordinator saves a checkpoint (with ``checkpoint``)
    and stops early with :class:`Interrupted`. ``resume``: a loaded checkpoint to go on
    from. At the end the master waits up to ``drain_timeout`` s for the gradients still
    being computed (see :meth:`stop_workers`).

    The model state ``x0`` is ``[params | buffers]`` with ``n_params`` trained entries
    (all of it by default). The master owns the buffers too (BatchNorm statistics): a
    gradient message carries the buffers as the worker's forward pass left them (it
    started from the master's), and the master adopts them with the gradient.
    """

    def __init__(self, ctrl: Control, end: MasterEnd, x0: Tensor, optim: OptimConfig,
                 total: int, eval_at: list[int], snaps: Tensor,
                 checkpoint: CheckpointSpec | None = None,
                 resume: dict[str, Any] | None = None, drain_timeout: float = 3600.0,
                 n_params: int | None = None) -> None:
        self.ctrl, self.end, self.total, self.snaps = ctrl, end, total, snaps
        self.checkpoint, self.drain_timeout = checkpoint, drain_timeout
        self.n = end.n_workers
        self.opt = Optimizer(for_async_master(optim, self.n))
        self.x = x0.clone()
        self.n_params = x0.numel() if n_params is None else n_params
        self.state = self.opt.init(self.x[: self.n_params])
        self.progress = MasterProgress.fresh(self.n)
        # everything is restored before the first model goes out, so the versions the
        # workers see (and hence the recorded staleness) continue from the checkpoint
        if resume is not None:
            self.x.copy_(resume["x"])
            self.state = {k: v.clone() for k, v in resume["opt_state"].items()}
            torch.set_rng_state(resume["rng_torch"])
            self.progress = MasterProgress.from_checkpoint(resume, self.n)
        v = self.progress.version
        self.eval_points = iter([p for p in eval_at if p > v or (p == 0 and v == 0)])
        self.next_eval = next(self.eval_points, None)
        # --lookahead: each worker gets the model where it will be when its gradient
        # lands, about n - 1 updates from now (its own buffer: x keeps being updated)
        self.ahead = self.opt.hp.lookahead * (self.n - 1)
        self._ahead_buf = self.x.clone() if self.ahead > 0 else None
        self.step_lr = self.opt.hp.lr
        self.gone: set[int] = set()  # workers whose process died: the run goes on
        self.slot = 0
        self.loss_sum, self.loss_n = 0.0, 0
        self.t0 = 0.0

    # -- helpers ------------------------------------------------------------------
    def live(self) -> set[int]:
        return set(range(self.n)) - self.gone

    def lost(self, i: int) -> None:
        self.gone.add(i)
        if len(self.gone) == self.n:
            raise RuntimeError(f"all {self.n} workers died; nothing left to train with")

    def model_for_workers(self) -> Tensor:
        """The model a worker computes its next gradient at: ``x``, or with
        ``--lookahead`` the parameters moved ahead along the current step
        (:func:`~apam_gossip.optim.lookahead_point`), the buffers as they are."""
        if self._ahead_buf is None:
            return self.x
        n, buf = self.n_params, self._ahead_buf
        # steps of the size of the last one (the lr it was applied with)
        lookahead_point(buf[:n], self.x[:n], self.state, self.opt.hp, self.step_lr,
                        self.ahead)
        if self.x.numel() > n:
            buf[n:].copy_(self.x[n:])
        return buf

    def send(self, i: int, params: Tensor | None, msg: Params | Stop) -> None:
        try:
            self.end.send(i, params, msg)
        except PeerGone:
            self.lost(i)

    def wall(self) -> float:
        return time.monotonic() - self.t0

    # -- the steps ----------------------------------------------------------------
    def hello(self) -> None:
        """Wait until every worker has its data and model (or died meanwhile)."""
        waiting = set(range(self.n))
        deadline = time.monotonic() + HELLO_TIMEOUT_S
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"workers {sorted(waiting)} did not start within {HELLO_TIMEOUT_S:g} s")
            for i in self.end.ready(1.0):
                try:
                    msg, _ = self.end.recv(i)
                except PeerGone:
                    self.lost(i)
                else:
                    assert isinstance(msg, Hello), msg
                waiting.discard(i)

    def apply(self, i: int, msg: Grad, grad: Tensor) -> None:
        """One AMSGrad (or other) step with worker ``i``'s gradient (and its buffers)."""
        p, n = self.progress, self.n_params
        # the loop API's workers send their own learning rate (their schedule); else the
        # master's schedule over the budget
        stale = p.version - msg.version
        if msg.lr is not None:  # the user's schedule; the staleness rule still applies
            lr = msg.lr * staleness_scale(self.opt.hp.staleness_lr, stale)
        else:
            lr = self.opt.lr_at(p.version + 1, self.total, stale)
        self.step_lr = lr  # --lookahead: the steps ahead are taken of this size
        self.opt.update(self.x[:n], grad[:n], self.state, lr=lr)
        if self.x.numel() > n:
            self.x[n:].copy_(grad[n:])
        p.record(i, msg.version, msg.samples)
        self.loss_sum += msg.loss
        self.loss_n += 1

    def snapshot(self, final: bool = False) -> None:
        """Copy the model into the next snapshot slot and announce it."""
        p = self.progress
        self.snaps[self.slot].copy_(self.x)
        train_loss = self.loss_sum / self.loss_n if self.loss_n else None
        self.ctrl.send(Snapshot(self.slot, self.wall(), p.samples, p.version, train_loss,
                                final))
        self.slot += 1
        self.loss_sum, self.loss_n = 0.0, 0

    def save(self) -> None:
        assert self.checkpoint is not None
        if not bool(torch.isfinite(self.x).all()):  # keep the last good checkpoint
            raise Diverged(f"master: the model is no longer finite at update "
                           f"{self.progress.version}; the run stopped and the checkpoint "
                           f"{self.checkpoint.path} was left as it was")
        p = self.progress
        save_checkpoint(self.checkpoint.path, {
            "config": self.checkpoint.config, "mode": "centralized", "x": self.x.clone(),
            "opt_state": {k: v.clone() for k, v in self.state.items()},
            "version": p.version, "samples": p.samples,
            "staleness": {int(k): int(v) for k, v in p.staleness.items()},
            "updates_of": list(p.updates_of), "samples_of": list(p.samples_of),
            "wall_time": self.wall(), "resumes": self.checkpoint.resumes,
            "rng_torch": torch.get_rng_state(),
        })

    def stop_workers(self, idle: set[int]) -> None:
        """Tell every live worker to stop, without leaving one mid-message: a worker still
        computing (all but ``idle``) gets its stop only after its last gradient has been
        taken (and dropped: the budget is spent), so it never sends into a closed
        connection, however slow it is."""
        for i in idle & self.live():
            self.send(i, None, Stop())
        busy = self.live() - idle
        deadline = time.monotonic() + self.drain_timeout
        while busy:
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {sorted(busy)} did not return their last "
                                   f"gradient within {self.drain_timeout:g} s of the end")
            for i in self.end.ready(0.5):
                busy.discard(i)
                try:
                    self.end.recv(i)
                except PeerGone:
                    self.lost(i)
                    continue
                self.send(i, None, Stop())
            busy &= self.live()

    # -- the loop -----------------------------------------------------------------
    def run(self) -> None:
        self.hello()
        p = self.progress
        self.t0 = time.monotonic() - p.wall_before
        for i in self.live():
            self.send(i, self.x, Params(p.version))
        if self.next_eval == 0:
            self.snapshot()
            self.next_eval = next(self.eval_points, None)
        last_progress = last_ckpt = time.monotonic()
        while p.version < self.total:
            for i in self.end.ready(1.0):
                try:
                    msg, grad = self.end.recv(i)
                except PeerGone:  # died while computing: its gradient never comes
                    self.lost(i)
                    continue
                self.apply(i, msg, grad)
                if p.version >= self.total:
                    self.finish(idle={i})
                    return
                self.send(i, self.model_for_workers(), Params(p.version))
                if p.version == self.next_eval:
                    self.snapshot()
                    self.next_eval = next(self.eval_points, None)
                if self.ctrl.poll():  # a stop request is answered before anything else
                    break
            if self.ctrl.poll():  # the coordinator asks to stop (SIGTERM): save, then stop
                self.interrupt()
                return
            now = time.monotonic()
            if now - last_progress > PROGRESS_EVERY_S:
                self.ctrl.send(Progress(p.samples, p.version))
                last_progress = now
            if self.checkpoint is not None and now - last_ckpt > self.checkpoint.every_s:
                self.save()
                last_ckpt = time.monotonic()
        self.finish(idle=set())  # reached only when the budget was already spent

    def interrupt(self) -> None:
        """A stop request: the checkpoint first (under mpirun, a SIGTERM from mpirun
        itself is followed by its SIGKILL half a second later), then stop the workers in
        order and report :class:`Interrupted`."""
        msg = self.ctrl.recv()
        assert isinstance(msg, StopRequest), msg
        if self.checkpoint is not None:
            self.save()
        self.stop_workers(idle=set())  # every live worker holds a model: busy
        self.ctrl.send(Interrupted(self.checkpoint.path if self.checkpoint else None,
                                   self.progress.version))

    def finish(self, idle: set[int]) -> None:
        p = self.progress
        wall = self.wall()
        self.snapshot(final=True)  # scored while the last gradients drain
        self.stop_workers(idle)
        self.ctrl.send(MasterSummary(wall, p.version, p.samples, dict(p.staleness),
                                     list(p.updates_of), list(p.samples_of),
                                     sorted(self.gone)))


def master_main(ctrl: Control, end: MasterEnd, *args: Any, **kwargs: Any) -> None:
    """The master process: :class:`ApamMaster` ``(ctrl, end, *args, **kwargs).run()``."""
    ApamMaster(ctrl, end, *args, **kwargs).run()


def worker_main(ctrl: Control, end: WorkerEnd, cfg: RunConfig, task: Task, data: Any,
                shard: Tensor, device: str) -> None:
    """Receive x, compute one gradient at it, send it (with the buffers its forward pass
    moved); until the master says stop."""
    w = LocalWorker.build(cfg, task, data, shard, end.worker, torch.device(device))
    link = LinkModel(cfg.network, 4 * w.flat.numel)
    to_master = link.seconds(end.worker, MASTER)  # emulated link: down and up per update
    end.send(None, Hello(end.worker))
    first = True
    while True:
        msg = end.recv(w.flat.state, timeout=cfg.timeout_s)
        if isinstance(msg, Stop):
            break
        if not first:
            link.sleep(to_master)
        first = False
        loss, n_samples, dt = w.gradient()
        link.sleep(to_master)
        end.send(w.flat.pack_grad_msg(), Grad(msg.version, n_samples, loss, dt))
    ctrl.send(w.report())
