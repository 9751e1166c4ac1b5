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
budgeted number of updates; gradients still in flight then are discarded.
"""

from __future__ import annotations

import time
from collections import Counter
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


def master_main(ctrl: Connection, end: MasterEnd, x0: Tensor, optim: OptimConfig,
                total: int, eval_at: list[int], snaps: Tensor,
                checkpoint: dict[str, Any] | None = None,
                resume: dict[str, Any] | None = None) -> None:
    """Run the master until ``total`` updates; report snapshots and a summary on ``ctrl``.

    ``snaps[j]`` receives the model at the j-th evaluation point (``eval_at[j]`` updates)
    and, last, the final model; each is announced with a ``("snap", j, ...)`` message.

    ``checkpoint`` = {"path", "every_s", "config", "resumes"}: write a checkpoint that often
    and when the coordinator sends ``("stop",)`` (then stop early and report
    ``("interrupted", path)``). ``resume``: a loaded checkpoint to continue from.
    """
    opt = optim.build()
    x = x0.clone()
    state = opt.init(x)
    n = end.n_workers
    if resume is not None:
        x.copy_(resume["x"])
        state = {k: v.clone() for k, v in resume["opt_state"].items()}
        torch.set_rng_state(resume["rng_torch"])

    gone: set[int] = set()  # workers whose process died: the run goes on without them

    def lost(i: int) -> None:
        gone.add(i)
        if len(gone) == n:
            raise RuntimeError(f"all {n} workers died; nothing left to train with")

    waiting = set(range(n))
    deadline = time.monotonic() + HELLO_TIMEOUT_S
    while waiting:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"workers {sorted(waiting)} did not start within {HELLO_TIMEOUT_S:g} s")
        for i in end.ready(1.0):
            try:
                meta, _ = end.recv(i)
            except PeerGone:
                lost(i)
            else:
                assert meta[0] == "hello", meta
            waiting.discard(i)

    t0 = time.monotonic()
    for i in set(range(n)) - gone:
        try:
            end.send(i, x, ("x", 0))
        except PeerGone:
            lost(i)

    version = 0
    samples = 0
    staleness: Counter[int] = Counter()
    updates_of = [0] * n
    samples_of = [0] * n
    done_before = 0.0  # training seconds of the runs this one resumes
    if resume is not None:
        version, samples = int(resume["version"]), int(resume["samples"])
        staleness.update({int(k): int(v) for k, v in resume["staleness"].items()})
        updates_of = [int(v) for v in resume["updates_of"]]
        samples_of = [int(v) for v in resume["samples_of"]]
        done_before = float(resume["wall_time"])
        t0 -= done_before
    loss_sum, loss_n = 0.0, 0
    slot = 0
    next_eval = iter([p for p in eval_at if p > version or (p == 0 and version == 0)])
    eval_point = next(next_eval, None)
    last_progress = t0
    last_ckpt = time.monotonic()

    def save() -> None:
        assert checkpoint is not None
        save_checkpoint(checkpoint["path"], {
            "config": checkpoint["config"], "mode": "centralized", "x": x.clone(),
            "opt_state": {k: v.clone() for k, v in state.items()}, "version": version,
            "samples": samples, "staleness": {int(k): int(v) for k, v in staleness.items()},
            "updates_of": list(updates_of), "samples_of": list(samples_of),
            "wall_time": time.monotonic() - t0, "resumes": checkpoint["resumes"],
            "rng_torch": torch.get_rng_state(),
        })

    def snapshot(final: bool = False) -> None:
        nonlocal slot, loss_sum, loss_n
        snaps[slot].copy_(x)
        train_loss = loss_sum / loss_n if loss_n else None
        ctrl.send(("snap", slot, time.monotonic() - t0, samples, version, train_loss, final))
        slot += 1
        loss_sum, loss_n = 0.0, 0

    if eval_point == 0:
        snapshot()
        eval_point = next(next_eval, None)

    while version < total:
        for i in end.ready(1.0):
            try:
                meta, grad = end.recv(i)
            except PeerGone:  # died while computing: its gradient never comes
                lost(i)
                continue
            _, v_from, n_samples, loss, _compute_s = meta
            opt.update(x, grad, state)
            staleness[version - v_from] += 1
            version += 1
            samples += n_samples
            updates_of[i] += 1
            samples_of[i] += n_samples
            loss_sum += loss
            loss_n += 1
            if version >= total:
                break
            try:
                end.send(i, x, ("x", version))
            except PeerGone:
                lost(i)
            if version == eval_point:
                snapshot()
                eval_point = next(next_eval, None)
        now = time.monotonic()
        if now - last_progress > PROGRESS_EVERY_S:
            ctrl.send(("progress", samples, version))
            last_progress = now
        if checkpoint is not None and now - last_ckpt > checkpoint["every_s"]:
            save()
            last_ckpt = time.monotonic()
        if ctrl.poll():  # the coordinator asks to stop (SIGTERM): checkpoint, then stop
            msg = ctrl.recv()
            assert msg[0] == "stop", msg
            if checkpoint is not None:
                save()
            for i in set(range(n)) - gone:
                try:
                    end.send(i, None, ("stop",))
                except PeerGone:
                    gone.add(i)
            ctrl.send(("interrupted", checkpoint["path"] if checkpoint else None, version))
            return

    wall = time.monotonic() - t0
    for i in set(range(n)) - gone:
        try:
            end.send(i, None, ("stop",))
        except PeerGone:
            gone.add(i)
    snapshot(final=True)
    ctrl.send(("done", {
        "wall_time": wall, "updates": version, "samples": samples,
        "staleness": dict(staleness), "updates_of": updates_of, "samples_of": samples_of,
        "failed_workers": sorted(gone),
    }))


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
