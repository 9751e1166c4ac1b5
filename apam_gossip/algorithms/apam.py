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

**Sharded** (``master_shards = K > 1``, :class:`~apam_gossip.core.apam.Shard`): K master
processes, each the loop above over its slice of the model, in the roles of
:mod:`.shards`. A worker sends slice ``k`` of its gradient to shard ``k`` (shard 0 first),
then waits for every shard's slice of the model (:mod:`~apam_gossip.transport.sharded`).
So that every shard applies the same gradients exactly once, shard 0 (the leader) keeps
the budget: it asks for exactly ``total`` gradients and drops none, while the other
shards (followers) apply whatever reaches them and end when every worker has gone, which
a worker does only when the leader tells it to stop. Checkpoints (periodic, and at a
stop) are consistent cuts: the leader asks for no more gradients, applies those asked
for, and every shard saves its part at that version; the leader joins the parts into
one checkpoint of the whole model, which resumes with any number of shards. A worker
killed between two of its slices leaves its last gradient applied by the shards it
reached (at K = 1 such a death loses at most that gradient too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import save_checkpoint, shard_part_path
from ..config import OptimConfig, RunConfig
from ..core.apam import ApamCore, MasterProgress, Shard
from ..emulation import MASTER, LinkModel
from ..messages import (
    PROGRESS_EVERY_S,
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
from ..task import Task
from ..transport import Control, MasterEnd, PeerGone, ShardLink, WorkerEnd
from .common import Diverged, LocalWorker
from .shards import Follower, Leader

HELLO_TIMEOUT_S = 300.0


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

    The rule of an update is :class:`~apam_gossip.core.apam.ApamCore`'s (``core``: the
    model ``x0`` = ``[params | buffers]`` with ``n_params`` trained entries, its optimizer
    state and progress); this class is its driver: the budget, snapshots, checkpoints,
    the workers' messages and deaths.

    ``device``: where the model and optimizer state live and updates are applied (a GPU:
    see :func:`~apam_gossip.placement.master_device`). Gradients arrive, and models leave,
    in the transport's buffers (``end.device``): the same GPU on shared memory, host
    buffers under MPI, staged through a pinned host copy.
    """

    def __init__(self, ctrl: Control, end: MasterEnd, x0: Tensor, optim: OptimConfig,
                 total: int, eval_at: list[int], snaps: Tensor,
                 checkpoint: CheckpointSpec | None = None,
                 resume: dict[str, Any] | None = None, drain_timeout: float = 3600.0,
                 n_params: int | None = None, device: torch.device | str = "cpu",
                 shard: Shard | None = None, link: ShardLink | None = None) -> None:
        self.ctrl, self.end, self.total, self.snaps = ctrl, end, total, snaps
        self.checkpoint, self.drain_timeout = checkpoint, drain_timeout
        self.n = end.n_workers
        self.device = torch.device(device)
        # a shard of a sharded master: its slice of everything whole-model
        self.shard = shard if shard is not None and shard.count > 1 else None
        if self.shard is not None:
            x0, n_params = self.shard.of(x0), self.shard.n_params
            self.snaps = snaps[:, self.shard.start:self.shard.stop]
        self.core = ApamCore(x0.to(self.device), optim, self.n, total=total,
                             n_params=x0.numel() if n_params is None else n_params)
        self.x = self.core.x  # the model (updated in place by the core)
        end_device = getattr(end, "device", torch.device("cpu"))
        # a GPU master behind host buffers (MPI): models leave through one pinned copy
        self._staged = None if end_device == self.device else torch.empty(
            x0.numel(), dtype=x0.dtype, device=end_device,
            pin_memory=end_device.type == "cpu" and self.device.type == "cuda")
        # everything is restored before the first model goes out, so the versions the
        # workers see (and hence the recorded staleness) continue from the checkpoint
        if resume is not None:
            x, state = resume["x"], resume["opt_state"]
            if self.shard is not None:  # a checkpoint holds the whole model
                x, state = self.shard.of(x), self.shard.state_of(state)
            self.core.restore(x, state,
                              progress=MasterProgress.from_checkpoint(resume, self.n))
            torch.set_rng_state(resume["rng_torch"])
        v = self.core.version
        self.eval_points = iter([p for p in eval_at if p > v or (p == 0 and v == 0)])
        self.next_eval = next(self.eval_points, None)
        self.gone: set[int] = set()  # workers whose process died: the run goes on
        self.slot = 0
        self.loss_sum, self.loss_n = 0.0, 0
        self.t0 = 0.0
        self.applied_at = 0.0  # wall time of the last update
        # a shard's role (None: the one master)
        self.role: Leader | Follower | None = None
        if self.shard is not None:
            assert link is not None, "a shard needs its link to the others"
            self.role = Leader(self, link) if self.shard.leader else Follower(self, link)

    @property
    def follower(self) -> bool:
        return isinstance(self.role, Follower)

    # -- helpers ------------------------------------------------------------------
    def live(self) -> set[int]:
        return set(range(self.n)) - self.gone

    def lost(self, i: int) -> None:
        self.gone.add(i)
        if self.role is not None:
            self.role.lost(i)
        if len(self.gone) == self.n and not self.follower:
            # (a follower's end: every worker goes once the leader has stopped it)
            raise RuntimeError(f"all {self.n} workers died; nothing left to train with")

    def send(self, i: int, params: Tensor | None, msg: Params | Stop) -> None:
        if params is not None and self._staged is not None:
            self._staged.copy_(params)  # waits for the copy: the buffer is whole
            params = self._staged
        try:
            self.end.send(i, params, msg)
        except PeerGone:
            self.lost(i)

    def give(self, i: int, model: Tensor | None = None) -> None:
        """Worker ``i``'s next model (``model``, or the core's model for workers). The
        leader sends it only while it has gradients left to ask for; past that ``i``
        waits (for a gradient a dead worker never sent, or for the end)."""
        if self.role is not None and not self.role.give(i):
            return
        self.send(i, self.core.model_for_workers() if model is None else model,
                  Params(self.core.version))

    def wall(self) -> float:
        return time.monotonic() - self.t0

    def end_wall(self) -> float:
        """The run's wall time at this master's end: now, or a follower's last update
        (it ends once the workers have gone, which takes them a while)."""
        return self.applied_at if self.follower else self.wall()

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
        """The core's update with worker ``i``'s gradient (and its buffers)."""
        self.core.apply(i, grad.to(self.device), msg.version, msg.samples, msg.lr)
        self.loss_sum += msg.loss
        self.loss_n += 1
        self.applied_at = self.wall()

    def snapshot(self, final: bool = False) -> None:
        """Copy the model into the next snapshot slot and announce it."""
        p = self.core.progress
        # shards: the final model in the last row, whatever points each one passed
        slot = len(self.snaps) - 1 if final and self.shard is not None else self.slot
        self.snaps[slot].copy_(self.x)
        train_loss = self.loss_sum / self.loss_n if self.loss_n else None
        wall = self.end_wall() if final else self.wall()
        self.ctrl.send(Snapshot(slot, wall, p.samples, p.version, train_loss, final))
        self.slot += 1
        self.loss_sum, self.loss_n = 0.0, 0

    def save(self) -> None:
        assert self.checkpoint is not None
        if not self.core.finite():  # keep the last good checkpoint
            raise Diverged(f"master: the model is no longer finite at update "
                           f"{self.core.version}; the run stopped and the checkpoint "
                           f"{self.checkpoint.path} was left as it was")
        p = self.core.progress
        assert self.core.state is not None
        save_checkpoint(self.part_path(), {
            "config": self.checkpoint.config, "mode": "centralized",
            "x": self.x.to("cpu", copy=True),  # checkpoints hold host tensors
            "opt_state": {k: v.to("cpu", copy=True) for k, v in self.core.state.items()},
            "version": p.version, "samples": p.samples,
            "staleness": {int(k): int(v) for k, v in p.staleness.items()},
            "updates_of": list(p.updates_of), "samples_of": list(p.samples_of),
            "wall_time": self.wall(), "resumes": self.checkpoint.resumes,
            "rng_torch": torch.get_rng_state(),
            **({"shard": [self.shard.index, self.shard.count]} if self.shard else {}),
        })

    def part_path(self) -> str:
        """Where this master saves: the checkpoint, or a shard's part of it (which the
        coordinator joins into the checkpoint)."""
        assert self.checkpoint is not None
        if self.shard is None:
            return self.checkpoint.path
        return shard_part_path(self.checkpoint.path, self.shard.index, self.shard.count)

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
        p = self.core.progress
        self.t0 = time.monotonic() - p.wall_before
        for i in sorted(self.live()):
            self.give(i, self.x)
        if self.next_eval == 0:
            self.snapshot()
            self.next_eval = next(self.eval_points, None)
        last_progress = last_ckpt = time.monotonic()
        leader = self.role if isinstance(self.role, Leader) else None
        if leader is not None:
            leader.started()
        # a shard listens to the others between messages too
        wait_s = 1.0 if self.role is None else 0.05
        # (a leader asked to stop goes on until its cut, even past the budget)
        while self.follower or p.version < self.total or (leader and leader.stopping):
            for i in self.end.ready(wait_s):
                try:
                    msg, grad = self.end.recv(i)
                except PeerGone:  # died while computing: its gradient never comes
                    self.lost(i)
                    continue
                if self.role is not None:
                    self.role.took(i)
                self.apply(i, msg, grad)
                if not self.follower and p.version >= self.total \
                        and not (leader and leader.stopping):
                    self.finish(idle={i} | (leader.waiting if leader else set()))
                    return
                self.give(i)
                if p.version == self.next_eval:
                    self.snapshot()
                    self.next_eval = next(self.eval_points, None)
                if self.ctrl.poll():  # a stop request is answered before anything else
                    break
            if self.role is not None:
                if self.role.ended_round():
                    return
            elif self.ctrl.poll():  # the coordinator asks to stop (SIGTERM): save, then stop
                self.interrupt()
                return
            now = time.monotonic()
            if now - last_progress > PROGRESS_EVERY_S and not self.follower:
                self.ctrl.send(Progress(p.samples, p.version))
                last_progress = now
            # (a sharded master's leader makes its checkpoints' cuts)
            if self.checkpoint is not None and self.role is None \
                    and now - last_ckpt > self.checkpoint.every_s:
                self.save()
                last_ckpt = time.monotonic()
        # reached only when the budget was already spent (a resume at its end): the one
        # master's workers each hold a model, a leader's all wait
        self.finish(idle=set(leader.waiting) if leader else set())

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
                                   self.core.version))

    def finish(self, idle: set[int]) -> None:
        p = self.core.progress
        wall = self.end_wall()
        self.snapshot(final=True)  # scored while the last gradients drain
        self.stop_workers(idle)
        if self.role is not None:
            self.role.finished()
        self.ctrl.send(MasterSummary(wall, p.version, p.samples, dict(p.staleness),
                                     list(p.updates_of), list(p.samples_of),
                                     sorted(self.gone)))


def master_main(ctrl: Control, end: MasterEnd, *args: Any, **kwargs: Any) -> None:
    """The master process: :class:`ApamMaster` ``(ctrl, end, *args, **kwargs).run()``."""
    ApamMaster(ctrl, end, *args, **kwargs).run()


def apam_worker_main(ctrl: Control, end: WorkerEnd, cfg: RunConfig, task: Task, data: Any,
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
