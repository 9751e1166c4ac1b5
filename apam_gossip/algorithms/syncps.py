"""syncps: synchronous AMSGrad with a parameter server, the APAM paper's comparator.

Master (owns x and the optimizer state), for k = 1 .. steps::

    send x to every worker
    wait for all n gradient messages [grads | buffers] (worker i: its share b_i of B)
    x <- syncps_step(x, sample-weighted mean of the messages)     # one optimizer step

Worker ``i``: receive x -> one gradient on its batch of ``b_i`` samples -> send; the
same loop as an APAM worker (:func:`~apam_gossip.algorithms.apam.apam_worker_main`,
emulated links included), with ``data.batch_size = b_i``
(:func:`~apam_gossip.core.sync.split_batch`: the global batch ``B`` split over the
workers). The rule of a step is :func:`~apam_gossip.core.sync.syncps_step`'s; this
module is its driver over a star transport (shared memory or MPI): the budget, the
snapshots, progress, a stop request, the workers' messages.

Every step lasts as long as the slowest worker's gradient. The messages are reduced in
worker order whatever order they arrive in, so a run is deterministic: the same config
gives the same model on either transport, and with one worker the sequential run's.
A worker that dies fails the run (lockstep: nobody can go on without it); a stop request
stops every worker at a step boundary (no checkpoint).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from ..config import OptimConfig, RunConfig
from ..core.sync import split_batch, syncps_step
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
from ..optim import Optimizer
from ..task import Task
from ..transport import Control, MasterEnd, PeerGone, WorkerEnd
from .apam import HELLO_TIMEOUT_S, apam_worker_main


class WorkerLost(RuntimeError):
    """A syncps worker's process went away: the lockstep run cannot go on."""


def syncps_worker_config(cfg: RunConfig, worker: int) -> RunConfig:
    """The config worker ``worker`` trains with: its share of the global batch."""
    return cfg.replace(data={"batch_size": split_batch(cfg.data.batch_size,
                                                      cfg.workers)[worker]})


def syncps_worker_main(ctrl: Control, end: WorkerEnd, cfg: RunConfig, task: Task, data: Any,
                       shard: Tensor, device: str) -> None:
    """A syncps worker: an APAM worker on its share of the global batch."""
    apam_worker_main(ctrl, end, syncps_worker_config(cfg, end.worker), task, data, shard,
                     device)


class SyncPsMaster:
    """The master's loop (see the module docstring). ``snaps[j]`` receives the model at
    the j-th evaluation point (``eval_at[j]`` steps) and, last, the final model, each
    announced with a :class:`~apam_gossip.messages.Snapshot`; at the end a
    :class:`~apam_gossip.messages.MasterSummary` (or, after a stop request,
    :class:`~apam_gossip.messages.Interrupted`). ``timeout``: how long one step may wait
    for the workers' gradients. ``device``: where x, its optimizer state and the step
    live."""

    def __init__(self, ctrl: Control, end: MasterEnd, x0: Tensor, optim: OptimConfig,
                 total: int, eval_at: list[int], snaps: Tensor, n_params: int,
                 timeout: float, device: torch.device | str = "cpu") -> None:
        self.ctrl, self.end, self.total, self.snaps = ctrl, end, total, snaps
        self.n = end.n_workers
        self.n_params, self.timeout = n_params, timeout
        self.device = torch.device(device)
        self.opt = Optimizer(optim)  # synchronous: no staleness rule
        self.x = x0.to(self.device, copy=True)
        self.state = self.opt.init(self.x[:n_params])
        # each worker's message, kept until all have come (a transport may receive every
        # worker's message into one buffer), and the mean
        self.rows = torch.zeros(self.n, x0.numel(), dtype=x0.dtype, device=self.device)
        self.mean = torch.zeros(x0.numel(), dtype=x0.dtype, device=self.device)
        end_device = getattr(end, "device", torch.device("cpu"))
        self._staged = None if end_device == self.device else torch.empty(
            x0.numel(), dtype=x0.dtype, device=end_device,
            pin_memory=end_device.type == "cpu" and self.device.type == "cuda")
        self.eval_at = set(eval_at)
        self.version = self.samples = 0
        self.updates_of = [0] * self.n
        self.samples_of = [0] * self.n
        self.slot = 0
        self.loss_sum, self.loss_n = 0.0, 0
        self.t0 = 0.0

    def wall(self) -> float:
        return time.monotonic() - self.t0

    def recv(self, i: int) -> tuple[Any, Tensor]:
        try:
            return self.end.recv(i)
        except PeerGone:
            raise WorkerLost(f"worker {i} died (its connection closed); syncps runs in "
                             "lockstep and cannot go on without it") from None

    def send(self, i: int, params: Tensor | None, msg: Params | Stop) -> None:
        if params is not None and self._staged is not None:
            self._staged.copy_(params)
            params = self._staged
        try:
            self.end.send(i, params, msg)
        except PeerGone:
            raise WorkerLost(f"worker {i} died (its connection closed); syncps runs in "
                             "lockstep and cannot go on without it") from None

    def hello(self) -> None:
        """Wait until every worker has its data and model."""
        waiting = set(range(self.n))
        deadline = time.monotonic() + HELLO_TIMEOUT_S
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"workers {sorted(waiting)} did not start within {HELLO_TIMEOUT_S:g} s")
            for i in self.end.ready(1.0):
                msg, _ = self.recv(i)
                assert isinstance(msg, Hello), msg
                waiting.discard(i)

    def gather(self) -> list[int]:
        """Every worker's message of this step into ``rows`` (in whatever order they
        arrive); returns each worker's number of samples."""
        samples: list[int | None] = [None] * self.n
        waiting = set(range(self.n))
        deadline = time.monotonic() + self.timeout
        loss = 0.0
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {sorted(waiting)} sent no gradient within "
                                   f"{self.timeout:g} s (step {self.version + 1})")
            for i in self.end.ready(1.0):
                msg, grad = self.recv(i)
                assert isinstance(msg, Grad) and i in waiting, (i, msg)
                assert msg.version == self.version, (msg.version, self.version)
                self.rows[i].copy_(grad)
                samples[i] = msg.samples
                loss += msg.loss * msg.samples
                waiting.discard(i)
        counts = [int(s) for s in samples if s is not None]
        self.loss_sum += loss / sum(counts)  # the loss of the global batch
        self.loss_n += 1
        return counts

    def step(self) -> None:
        counts = self.gather()
        self.version += 1
        syncps_step(self.opt, self.x, self.n_params, list(self.rows), counts, self.state,
                    self.opt.lr_at(self.version, self.total), self.mean)
        self.samples += sum(counts)
        for i, s in enumerate(counts):
            self.updates_of[i] += 1
            self.samples_of[i] += s

    def snapshot(self, final: bool = False) -> None:
        self.snaps[self.slot].copy_(self.x)
        train_loss = self.loss_sum / self.loss_n if self.loss_n else None
        self.ctrl.send(Snapshot(self.slot, self.wall(), self.samples, self.version,
                                train_loss, final))
        self.slot += 1
        self.loss_sum, self.loss_n = 0.0, 0

    def stop_workers(self) -> None:
        """Between steps every worker waits for the model: each gets its stop."""
        for i in range(self.n):
            self.send(i, None, Stop())

    def run(self) -> None:
        self.hello()
        self.t0 = time.monotonic()
        if 0 in self.eval_at:
            self.snapshot()
        last_progress = time.monotonic()
        while self.version < self.total:
            if self.ctrl.poll():  # a stop request (SIGTERM): at this step boundary
                msg = self.ctrl.recv()
                assert isinstance(msg, StopRequest), msg
                self.stop_workers()
                self.ctrl.send(Interrupted(None, self.version))
                return
            for i in range(self.n):
                self.send(i, self.x, Params(self.version))
            self.step()
            if self.version in self.eval_at and self.version < self.total:
                self.snapshot()
            now = time.monotonic()
            if now - last_progress > PROGRESS_EVERY_S:
                self.ctrl.send(Progress(self.samples, self.version))
                last_progress = now
        wall = self.wall()
        self.snapshot(final=True)
        self.stop_workers()
        self.ctrl.send(MasterSummary(wall, self.version, self.samples, {0: self.version},
                                     list(self.updates_of), list(self.samples_of), []))


def syncps_master_main(ctrl: Control, end: MasterEnd, *args: Any, **kwargs: Any) -> None:
    """The master process: :class:`SyncPsMaster` ``(ctrl, end, *args, **kwargs).run()``."""
    SyncPsMaster(ctrl, end, *args, **kwargs).run()


__all__ = ["SyncPsMaster", "syncps_master_main", "syncps_worker_main",
           "syncps_worker_config", "WorkerLost"]
