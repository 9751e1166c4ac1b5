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
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import save_checkpoint
from ..config import OptimConfig, RunConfig
from ..data import Dataset
from ..emulation import MASTER, LinkModel
from ..transport import MasterEnd, PeerGone, WorkerEnd
from .common import LocalWorker

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
    def from_checkpoint(cls, ck: dict[str, Any]) -> MasterProgress:
        return cls(int(ck["version"]), int(ck["samples"]),
                   Counter({int(k): int(v) for k, v in ck["staleness"].items()}),
                   [int(v) for v in ck["updates_of"]], [int(v) for v in ck["samples_of"]],
                   float(ck["wall_time"]))

    def record(self, worker: int, v_from: int, n_samples: int) -> None:
        """Count one applied gradient of ``worker`` computed at version ``v_from``."""
        self.staleness[self.version - v_from] += 1
        self.version += 1
        self.samples += n_samples
        self.updates_of[worker] += 1
        self.samples_of[worker] += n_samples


class _Master:
    """The master's loop (see the module docstring); :func:`master_main` runs it."""

    def __init__(self, ctrl: Connection, end: MasterEnd, x0: Tensor, optim: OptimConfig,
                 total: int, eval_at: list[int], snaps: Tensor,
                 checkpoint: dict[str, Any] | None, resume: dict[str, Any] | None,
                 drain_timeout: float) -> None:
        self.ctrl, self.end, self.total, self.snaps = ctrl, end, total, snaps
        self.checkpoint, self.drain_timeout = checkpoint, drain_timeout
        self.n = end.n_workers
        self.opt = optim.build()
        self.x = x0.clone()
        self.state = self.opt.init(self.x)
        self.progress = MasterProgress.fresh(self.n)
        # everything is restored before the first model goes out, so the versions the
        # workers see (and hence the recorded staleness) continue from the checkpoint
        if resume is not None:
            self.x.copy_(resume["x"])
            self.state = {k: v.clone() for k, v in resume["opt_state"].items()}
            torch.set_rng_state(resume["rng_torch"])
            self.progress = MasterProgress.from_checkpoint(resume)
        v = self.progress.version
        self.eval_points = iter([p for p in eval_at if p > v or (p == 0 and v == 0)])
        self.next_eval = next(self.eval_points, None)
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

    def send(self, i: int, params: Tensor | None, meta: tuple) -> None:
        try:
            self.end.send(i, params, meta)
        except PeerGone:
            self.lost(i)

    def wall(self) -> float:
        return time.monotonic() - self.t0

    def snapshot(self, final: bool = False) -> None:
        p = self.progress
        self.snaps[self.slot].copy_(self.x)
        train_loss = self.loss_sum / self.loss_n if self.loss_n else None
        self.ctrl.send(("snap", self.slot, self.wall(), p.samples, p.version, train_loss,
                        final))
        self.slot += 1
        self.loss_sum, self.loss_n = 0.0, 0

    def save(self) -> None:
        assert self.checkpoint is not None
        p = self.progress
        save_checkpoint(self.checkpoint["path"], {
            "config": self.checkpoint["config"], "mode": "centralized", "x": self.x.clone(),
            "opt_state": {k: v.clone() for k, v in self.state.items()},
            "version": p.version, "samples": p.samples,
            "staleness": {int(k): int(v) for k, v in p.staleness.items()},
            "updates_of": list(p.updates_of), "samples_of": list(p.samples_of),
            "wall_time": self.wall(), "resumes": self.checkpoint["resumes"],
            "rng_torch": torch.get_rng_state(),
        })

    # -- phases -------------------------------------------------------------------
    def wait_for_hellos(self) -> None:
        waiting = set(range(self.n))
        deadline = time.monotonic() + HELLO_TIMEOUT_S
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"workers {sorted(waiting)} did not start within {HELLO_TIMEOUT_S:g} s")
            for i in self.end.ready(1.0):
                try:
                    meta, _ = self.end.recv(i)
                except PeerGone:
                    self.lost(i)
                else:
                    assert meta[0] == "hello", meta
                waiting.discard(i)

    def stop_workers(self, idle: set[int]) -> None:
        """Tell every live worker to stop, without leaving one mid-message: a worker still
        computing (all but ``idle``) gets its stop only after its last gradient has been
        taken (and dropped: the budget is spent), so it never sends into a closed
        connection, however slow it is."""
        for i in idle & self.live():
            self.send(i, None, ("stop",))
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
                self.send(i, None, ("stop",))
            busy &= self.live()

    def run(self) -> None:
        self.wait_for_hellos()
        p = self.progress
        self.t0 = time.monotonic() - p.wall_before
        for i in self.live():
            self.send(i, self.x, ("x", p.version))
        if self.next_eval == 0:
            self.snapshot()
            self.next_eval = next(self.eval_points, None)
        last_progress = last_ckpt = time.monotonic()
        while p.version < self.total:
            for i in self.end.ready(1.0):
                try:
                    meta, grad = self.end.recv(i)
                except PeerGone:  # died while computing: its gradient never comes
                    self.lost(i)
                    continue
                _, v_from, n_samples, loss, _compute_s = meta
                self.opt.update(self.x, grad, self.state,
                                lr=self.opt.lr_at(p.version + 1, self.total))
                p.record(i, v_from, n_samples)
                self.loss_sum += loss
                self.loss_n += 1
                if p.version >= self.total:
                    self.finish(idle={i})
                    return
                self.send(i, self.x, ("x", p.version))
                if p.version == self.next_eval:
                    self.snapshot()
                    self.next_eval = next(self.eval_points, None)
            now = time.monotonic()
            if now - last_progress > PROGRESS_EVERY_S:
                self.ctrl.send(("progress", p.samples, p.version))
                last_progress = now
            if self.checkpoint is not None and now - last_ckpt > self.checkpoint["every_s"]:
                self.save()
                last_ckpt = time.monotonic()
            if self.ctrl.poll():  # the coordinator asks to stop (SIGTERM): save, then stop
                msg = self.ctrl.recv()
                assert msg[0] == "stop", msg
                if self.checkpoint is not None:
                    self.save()
                self.stop_workers(idle=set())  # every live worker holds a model: busy
                self.ctrl.send(("interrupted",
                                self.checkpoint["path"] if self.checkpoint else None,
                                p.version))
                return
        self.finish(idle=set())  # reached only when the budget was already spent

    def finish(self, idle: set[int]) -> None:
        p = self.progress
        wall = self.wall()
        self.snapshot(final=True)  # scored while the last gradients drain
        self.stop_workers(idle)
        self.ctrl.send(("done", {
            "wall_time": wall, "updates": p.version, "samples": p.samples,
            "staleness": dict(p.staleness), "updates_of": p.updates_of,
            "samples_of": p.samples_of, "failed_workers": sorted(self.gone),
        }))


def master_main(ctrl: Connection, end: MasterEnd, x0: Tensor, optim: OptimConfig,
                total: int, eval_at: list[int], snaps: Tensor,
                checkpoint: dict[str, Any] | None = None,
                resume: dict[str, Any] | None = None, drain_timeout: float = 3600.0) -> None:
    """Run the master until ``total`` updates; report snapshots and a summary on ``ctrl``.

    ``snaps[j]`` receives the model at the j-th evaluation point (``eval_at[j]`` updates)
    and, last, the final model; each is announced with a ``("snap", j, ...)`` message.

    ``checkpoint`` = {"path", "every_s", "config", "resumes"}: write a checkpoint that often
    and when the coordinator sends ``("stop",)`` (then stop early and report
    ``("interrupted", path)``). ``resume``: a loaded checkpoint to continue from.
    At the end the master waits up to ``drain_timeout`` s for the gradients still being
    computed (see :meth:`_Master.stop_workers`).
    """
    _Master(ctrl, end, x0, optim, total, eval_at, snaps, checkpoint, resume,
            drain_timeout).run()


def worker_main(ctrl: Connection, end: WorkerEnd, cfg: RunConfig, dataset: Dataset,
                shard: Tensor, device: str) -> None:
    """Receive x, compute one gradient at it, send it; until the master says stop."""
    w = LocalWorker.build(cfg, dataset, shard, end.worker, torch.device(device))
    link = LinkModel(cfg.network, 4 * w.flat.numel)
    to_master = link.seconds(end.worker, MASTER)  # emulated link: down and up per update
    end.send(None, ("hello",))
    first = True
    while True:
        meta = end.recv(w.flat.params, timeout=cfg.timeout_s)
        if meta[0] == "stop":
            break
        if not first:
            link.sleep(to_master)
        first = False
        version = meta[1]
        loss, n_samples, dt = w.gradient()
        link.sleep(to_master)
        end.send(w.flat.grads, ("g", version, n_samples, loss, dt))
    ctrl.send(("stats", {"worker": w.index, "device": str(w.device), "compute_s": w.compute_s,
                         "sleep_s": w.sleep_s, "batches": w.batches}))
