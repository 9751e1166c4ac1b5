"""The modes under ``mpirun``: every rank calls :func:`apam_gossip.run`; rank 0 returns the
RunResult (built by :mod:`apam_gossip.reporting`, as on one machine), the other ranks
return None.

* centralized: rank 0 is the master, ranks 1..N-1 are the workers (workers = size - 1);
  with ``master_shards = K``, ranks 0..K-1 are the master's shards (rank 0 the leader,
  which reports) and ranks K..N-1 the workers;
* decentralized: every rank is a worker (workers = size); rank 0 also gathers snapshots of
  all models at the evaluation points (through the ranks' gossip servers, each model taken
  under its own lock) and scores them after training, so evaluation never slows training;
* allreduce / dpsgd: every rank is a worker; rank 0 reports;
* syncps: rank 0 is the master (the parameter server), ranks 1..N-1 are the workers.

Each rank loads the data itself (ranks may be on different hosts) and computes the same
seeded :class:`~apam_gossip.plan.RunPlan`. The algorithms run unchanged: their control
messages stay in-process (:class:`~apam_gossip.messages.LocalOutbox`). Worker ``i`` uses
``cuda:(local_rank mod n_gpus)`` when CUDA is present.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from functools import partial
from typing import Any

import torch

from ..algorithms import adpsgd, apam, sync, syncps
from ..algorithms.apam import CheckpointSpec
from ..config import ConfigError, RunConfig
from ..coordinator import (
    NO_CHECKPOINT,
    UNSAVED_GOSSIP_MPI,
    UNSAVED_LOCKSTEP,
    RunInterrupted,
    SignalStop,
)
from ..core.compress import gamma_for, parse_compress, wire_bytes
from ..core.sync import split_batch
from ..evaluate import Evaluator
from ..messages import (
    Interrupted,
    LocalOutbox,
    MasterSummary,
    Progress,
    Snapshot,
    StopRequest,
    WorkerReport,
)
from ..placement import (
    device_for,
    master_device,
    mpi_masters,
    mpi_workers,
    node_placement,
    threads_per_worker,
)
from ..plan import RunPlan, worker_config
from ..reporting import (
    AuditBase,
    Callback,
    Event,
    SnapshotScorer,
    audit_errors,
    centralized_result,
    decentralized_result,
    gossip_eval_record,
    mean_train_loss,
    sync_result,
    syncps_result,
)
from ..result import EvalRecord, RunResult
from ..task import Task
from ..topology import neighbor_probabilities
from ..transport import mpi as tmpi
from .sequential import run_sequential
from .shards import MasterShards


def run_mpi(cfg: RunConfig, task: Task, data: Any, cb: Callback,
            ckpt: dict | None = None) -> RunResult | None:
    comm, rank, size = tmpi.world()
    if cfg.mode == "sequential":
        return run_sequential(cfg, task, data, cb) if rank == 0 else None
    masters = mpi_masters(cfg)
    n = mpi_workers(masters, size)
    if n < 1:
        what = "a master" if masters == 1 else f"{masters} master shards"
        raise ConfigError(f"{cfg.mode} mode over MPI needs at least {masters + 1} ranks "
                          f"({what} and a worker): use mpirun -n {masters + 1} or more")
    if ckpt is not None:  # a resume may have fewer (or more) ranks than the run it goes on
        cfg = cfg.for_workers(n)
    cfg = cfg.replace(workers=n, transport="mpi")
    if cfg.mode == "syncps":  # the global batch split over the workers mpirun started
        split_batch(cfg.data.batch_size, n)
    if len(cfg.slowdown) > n:
        raise ConfigError(f"slowdown has {len(cfg.slowdown)} entries but mpirun started "
                          f"{n} workers")
    if cfg.mode == "decentralized":
        tmpi.require_thread_multiple("decentralized mode over MPI (a server thread serves "
                                     "averages beside the training thread)")

        if cfg.checkpoint is not None:
            raise ConfigError("checkpoints of the decentralized mode are written on one "
                              "machine only so far; under mpirun use --mode centralized or "
                              "drop --checkpoint")
    lrank, on_node, _ = node_placement(comm)
    torch.set_num_threads(threads_per_worker(cfg, on_node))
    ctx = _RankContext(cfg, task, data, cb, comm, rank, device_for(cfg, lrank))
    # a stop request (SIGTERM, SIGINT, SIGUSR1) to a rank: each mode says what it does
    # (ctx.stop.on_stop); a rank never dies of the first one mid-message
    with ctx.stop:
        if cfg.mode == "centralized":
            return _centralized(ctx, ckpt)
        if cfg.mode in ("allreduce", "dpsgd"):
            return _sync(ctx)
        if cfg.mode == "syncps":
            return _syncps(ctx)
        return _decentralized(ctx)


class _RankContext:
    """One rank's view of the run: the plan, its device, and rank 0's reporting."""

    def __init__(self, cfg: RunConfig, task: Task, data: Any, cb: Callback, comm, rank: int,
                 device: torch.device) -> None:
        self.cfg, self.task, self.data, self.cb = cfg, task, data, cb
        self.comm, self.rank = comm, rank
        self.device = device
        self.plan = RunPlan.of(cfg, data, task)
        self.stop = SignalStop()
        # rank 0: the other ranks on its host, which it lets exit first after a stop
        here = socket.gethostname()
        peers = comm.gather((here, os.getpid()), root=0)
        self.peers = [pid for host, pid in peers[1:] if host == here] if rank == 0 else []

    def interrupted(self, checkpoint: str | None, updates: int,
                    unsaved: str = NO_CHECKPOINT) -> RunInterrupted:
        """Rank 0's exception for a run stopped on request (after every collective)."""
        e = RunInterrupted(checkpoint, updates, unsaved)
        e.peers = self.peers
        return e

    def progress_outbox(self) -> LocalOutbox:
        """An outbox that shows progress live (on rank 0) and keeps everything else."""
        total = self.plan.total_samples

        def live(msg: Any) -> bool:
            if isinstance(msg, Progress):
                if self.rank == 0:
                    self.cb(Event("progress", msg.samples, total))
                return True
            return False

        return LocalOutbox(live)

    def start_event(self) -> None:
        if self.rank == 0:
            self.cb(Event("start", 0, self.plan.total_samples))

    def scorer(self, snaps: torch.Tensor) -> SnapshotScorer:
        """Scores snapshots after training (their wall times were taken live)."""
        evaluator = Evaluator(self.task, self.data, self.device,
                              during=self.cfg.eval_samples)
        return SnapshotScorer(evaluator, snaps, self.plan.total_samples, self.cb)


def _centralized(ctx: _RankContext, ckpt: dict | None) -> RunResult | None:
    """Rank 0 is the master (with ``master_shards = K``, ranks 0..K-1 are its shards,
    rank 0 the leader); the other ranks are the workers. With ``cfg.checkpoint`` one
    master checkpoints periodically: when a rank dies, OpenMPI ends the whole job (this
    MPI has no fault-tolerance extensions such as ULFM), so the last checkpoint is what
    survives; ``--resume`` it, under mpirun or on one machine. A sharded master's
    followers send their parts of each checkpoint to the leader, which joins them."""
    cfg, plan, comm = ctx.cfg, ctx.plan, ctx.comm
    resumes = int(ckpt["resumes"]) + 1 if ckpt is not None else 0
    devices = comm.gather(str(ctx.device), root=0)
    outbox = ctx.progress_outbox()
    masters = MasterShards(cfg, plan.numel, plan.n_params, lambda msg: None)
    k_masters = masters.count
    if ctx.rank >= k_masters:
        ends = [tmpi.MpiStarWorker(comm, numel, master=k, first_worker=k_masters)
                for k, numel in enumerate(masters.numels)]
        # a stop request on a worker's rank rides on its next message to the master
        # (to every shard), which then stops the whole job as on its own stop request
        ctx.stop.on_stop = lambda: [e.request_stop() for e in ends] and None
        apam.apam_worker_main(outbox, masters.worker_end(ends), worker_config(cfg, resumes),
                              ctx.task, ctx.data, plan.shards[ctx.rank - k_masters],
                              str(ctx.device))
        comm.send(outbox.of_type(WorkerReport)[-1], dest=0, tag=tmpi.T_STATS)
        comm.Barrier()
        return None
    snaps = torch.zeros(len(plan.eval_at) + 1, plan.numel)
    ctx.start_event()
    shard = masters.shard(ctx.rank)
    link = tmpi.MpiShardLink(comm, ctx.rank, k_masters) if k_masters > 1 else None
    # the master checkpoints at once and stops the workers in order (a request that
    # reached a worker's rank comes with its next gradient; one that reached a follower
    # shard's goes on to the leader, which makes the stop's cut)
    ctx.stop.on_stop = partial(outbox.post, StopRequest())
    mdev = master_device(cfg)
    # a GPU master takes gradients from pinned host memory (one DMA copy to the device);
    # a CPU master never pins (that would open a CUDA context it does not use)
    end = tmpi.MpiStarMaster(comm, masters.numels[ctx.rank], timeout=cfg.timeout_s,
                             pin=mdev.type == "cuda", first_worker=k_masters)
    if ctx.rank == 0:
        outbox.asked = lambda: end.stop_asked
    checkpoint = None if cfg.checkpoint is None else CheckpointSpec(
        cfg.checkpoint, cfg.checkpoint_every_s, cfg.replace(transport="auto").to_dict(),
        resumes)
    apam.master_main(outbox, end, plan.x0, cfg.optim, plan.total, plan.eval_at, snaps,
                     checkpoint, ckpt, cfg.timeout_s, plan.n_params, mdev, shard, link)
    if ctx.rank != 0:
        _follower_report(comm, outbox, snaps, shard)
        comm.Barrier()
        return None
    stopped = outbox.of_type(Interrupted)
    reports = {}
    for r in range(k_masters, comm.Get_size()):
        rep = comm.recv(source=r, tag=tmpi.T_STATS)
        reports[rep.worker] = rep
    followers = [comm.recv(source=k, tag=tmpi.T_SHARD_END) for k in range(1, k_masters)]
    comm.Barrier()
    if stopped:  # (the leader joined the checkpoint)
        raise ctx.interrupted(stopped[-1].checkpoint, stopped[-1].updates)
    scorer = ctx.scorer(snaps)
    masters.scorer = scorer
    for k, (snapshots, cols, ended) in enumerate(followers, start=1):
        assert masters.shards is not None
        masters.shards[k].of(snaps.T).copy_(cols.T)  # its slice of every snapshot
        for msg in snapshots:
            masters.snapshot(masters.names[k], msg)
        masters.summarize(masters.names[k], ended)
    for msg in outbox.of_type(Snapshot):
        masters.snapshot(masters.names[0], msg)
    masters.summarize(masters.names[0], outbox.of_type(MasterSummary)[-1])
    assert masters.summary is not None
    # the workers are the ranks after the master's
    return masters.annotate(centralized_result(cfg, masters.summary, reports,
                                               devices[k_masters:], scorer, plan.n_params,
                                               "mpi"))


def _follower_report(comm, outbox: LocalOutbox, snaps: torch.Tensor, shard) -> None:
    """A follower's end, to rank 0: its snapshots' messages and its slice of them, and its
    summary (or its stop)."""
    ended = (outbox.of_type(MasterSummary) or outbox.of_type(Interrupted))[-1]
    comm.send((outbox.of_type(Snapshot), shard.of(snaps.T).T.clone(), ended), dest=0,
              tag=tmpi.T_SHARD_END)


def _decentralized(ctx: _RankContext) -> RunResult | None:
    cfg, plan, comm, rank = ctx.cfg, ctx.plan, ctx.comm, ctx.rank
    nb, probs = plan.neighbors(rank)
    # the model, u and the local step on this rank's device (its GPU: exchanges go
    # through pinned host buffers)
    comp = parse_compress(cfg.compress)
    if comp is not None:  # the edges' copies start at the start, which must be one model
        # to the bit on every rank (a user's model built from local files might not be)
        comm.Bcast(plan.x0.numpy(), root=0)
    g = tmpi.MpiGossip(comm, plan.x0, cfg.adaptive_state == "tracked", plan.total,
                       cfg.timeout_s, n_tracked=plan.n_params, device=ctx.device,
                       compress=comp, gamma=gamma_for(comp, cfg.compress_gamma),
                       neighbors=nb)  # every rank starts from plan.x0: the copies too
    # a stop request on any rank: it claims no more updates and its next claim tells
    # rank 0, which hands out no more, so every rank ends within one update; they
    # finish together as at the end of the budget (no checkpoint here)
    ctx.stop.on_stop = g.request_stop
    points = [p for p in plan.eval_at if p < plan.total]
    monitor = None
    stop_monitor = threading.Event()
    snaps: list[tuple[float, int, torch.Tensor]] = []
    if rank == 0:
        ctx.start_event()

        def watch() -> None:
            pending = list(points)
            while not stop_monitor.is_set() and pending:
                claimed = g.claimed
                if claimed >= pending[0]:
                    xs = g.gather_snapshots()
                    snaps.append((time.monotonic() - g.t0, claimed, xs))
                    while pending and pending[0] <= claimed:
                        pending.pop(0)
                else:
                    ctx.cb(Event("progress", claimed * cfg.data.batch_size,
                                 plan.total_samples))
                    stop_monitor.wait(0.01)

        monitor = threading.Thread(target=watch, name="gossip-monitor", daemon=True)

    comm.Barrier()  # every rank has its data, model and server up: the clock starts
    g.t0 = time.monotonic()
    if monitor is not None:
        monitor.start()
    outbox = LocalOutbox()
    try:
        adpsgd.gossip_worker_main(outbox, g, cfg, ctx.task, ctx.data, plan.shards[rank],
                           str(ctx.device),
                           nb, probs, plan.total)
    finally:
        stop_monitor.set()
        if monitor is not None:
            monitor.join(timeout=cfg.timeout_s)
    g.finish()  # waits for every rank to finish; servers serve meanwhile
    wall = time.monotonic() - g.t0
    reports = comm.gather(outbox.of_type(WorkerReport)[-1], root=0)
    devices = comm.gather(str(ctx.device), root=0)
    xs = torch.zeros(cfg.workers, plan.numel) if rank == 0 else None
    comm.Gather(g.x.to("cpu").contiguous(), xs, root=0)
    us = None
    if cfg.audit and g.u is not None:
        us = torch.zeros(cfg.workers, plan.n_params) if rank == 0 else None
        comm.Gather(g.u.to("cpu").contiguous(), us, root=0)
    if rank != 0:
        return None
    if g.stopping and g.claimed < plan.total:
        raise ctx.interrupted(None, g.claimed, UNSAVED_GOSSIP_MPI)

    evaluator = Evaluator(ctx.task, ctx.data, ctx.device, during=cfg.eval_samples)
    evals: list[EvalRecord] = []
    for wall_s, claimed, snap in snaps:
        rec, _ = gossip_eval_record(cfg, evaluator, snap, wall_s, claimed, None, None)
        evals.append(rec)
        ctx.cb(Event("eval", rec.samples, plan.total_samples, rec))
    by_worker = {r.worker: r for r in reports}
    rec, xbar = gossip_eval_record(cfg, evaluator, xs, wall, plan.total,
                                   mean_train_loss(reports),
                                   sum(r.averages for r in reports))
    rec.extra["refused_averages"] = sum(r.refused_averages for r in reports)
    rec.extra["bytes_per_average"] = float(wire_bytes(cfg, plan.numel, plan.n_params))
    if cfg.audit:  # every rank started from x0, u = vhat = 0
        base = AuditBase.of(plan.x0.expand(cfg.workers, -1),
                            torch.zeros(1, plan.n_params) if us is not None else None)
        rec.extra.update(audit_errors(base, xs, us, by_worker))
    evals.append(rec)
    ctx.cb(Event("eval", rec.samples, plan.total_samples, rec))
    return decentralized_result(cfg, by_worker, wall, devices, evals, xbar, plan.n_params,
                                "mpi")


def _sync(ctx: _RankContext) -> RunResult | None:
    """allreduce / dpsgd under mpirun: every rank is a worker; rank 0 reports."""
    cfg, plan, comm, rank = ctx.cfg, ctx.plan, ctx.comm, ctx.rank
    weights, nbrs = plan.mixing(rank)
    snaps = torch.zeros(len(plan.eval_at) + 1, plan.numel)
    end = tmpi.MpiSync(comm, plan.numel, nbrs, cfg.timeout_s)
    ctx.start_event()
    outbox = ctx.progress_outbox()
    # a stop request: the ranks vote at every step and stop together (no checkpoint)
    ctx.stop.on_stop = partial(outbox.post, StopRequest())
    sync.sync_worker_main(outbox, end, cfg, ctx.task, ctx.data, plan.shards[rank],
                          str(ctx.device),
                          plan.x0, plan.rounds, plan.eval_at, snaps, weights, nbrs)
    reports = comm.gather(outbox.of_type(WorkerReport)[-1], root=0)
    devices = comm.gather(str(ctx.device), root=0)
    if rank != 0:
        return None
    stopped = outbox.of_type(Interrupted)
    if stopped:
        # rounds, as its result counts
        raise ctx.interrupted(None, stopped[-1].updates, UNSAVED_LOCKSTEP)
    scorer = ctx.scorer(snaps)
    for msg in outbox.of_type(Snapshot):
        scorer(msg)
    return sync_result(cfg, {r.worker: r for r in reports}, devices, scorer, plan.rounds,
                       plan.n_params, "mpi")


def _syncps(ctx: _RankContext) -> RunResult | None:
    """syncps under mpirun: rank 0 is the parameter server, ranks 1..N-1 the workers, on
    the star of the centralized mode. A stop request on any rank stops the job at a step
    boundary (a worker's rides on its next gradient), with no checkpoint."""
    cfg, plan, comm = ctx.cfg, ctx.plan, ctx.comm
    devices = comm.gather(str(ctx.device), root=0)  # rank 0's first: the master's
    outbox = ctx.progress_outbox()
    if ctx.rank != 0:
        end = tmpi.MpiStarWorker(comm, plan.numel)
        ctx.stop.on_stop = end.request_stop
        syncps.syncps_worker_main(outbox, end, cfg, ctx.task, ctx.data,
                                  plan.shards[ctx.rank - 1], str(ctx.device))
        comm.send(outbox.of_type(WorkerReport)[-1], dest=0, tag=tmpi.T_STATS)
        comm.Barrier()
        return None
    snaps = torch.zeros(len(plan.eval_at) + 1, plan.numel)
    ctx.start_event()
    ctx.stop.on_stop = partial(outbox.post, StopRequest())
    mdev = master_device(cfg)
    end = tmpi.MpiStarMaster(comm, plan.numel, timeout=cfg.timeout_s,
                             pin=mdev.type == "cuda")
    outbox.asked = lambda: end.stop_asked
    syncps.syncps_master_main(outbox, end, plan.x0, cfg.optim, plan.total, plan.eval_at,
                              snaps, plan.n_params, cfg.timeout_s, mdev)
    reports = {}
    for r in range(1, comm.Get_size()):
        rep = comm.recv(source=r, tag=tmpi.T_STATS)
        reports[rep.worker] = rep
    comm.Barrier()
    stopped = outbox.of_type(Interrupted)
    if stopped:
        raise ctx.interrupted(None, stopped[-1].updates, UNSAVED_LOCKSTEP)
    scorer = ctx.scorer(snaps)
    for msg in outbox.of_type(Snapshot):
        scorer(msg)
    summary = outbox.of_type(MasterSummary)[-1]
    return syncps_result(cfg, summary, reports, devices[1:], scorer, plan.n_params, "mpi")


def exit_after_peers(peers: list[int], timeout: float = 30.0) -> None:
    """Rank 0 of a job that stopped on request, about to exit with 143: finalize MPI, then
    let the other ranks on this host exit first (at most ``timeout`` s). mpirun then
    reports the job's code quietly; a rank that exits non-zero while others still run
    makes it print a notice that it terminated the job."""
    from mpi4py import MPI

    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    deadline = time.monotonic() + timeout
    while peers and time.monotonic() < deadline:
        peers = [p for p in peers if os.path.exists(f"/proc/{p}")]
        time.sleep(0.02)


def mpi_gossip_consensus(graph, x0: torch.Tensor, averages_per_worker: int, seed: int = 0,
                         timeout_s: float = 120.0) -> torch.Tensor | None:
    """The MPI twin of :func:`apam_gossip.runtime.shm.gossip_consensus`: call on every rank
    (rank r starts from row r of ``x0``); rank 0 gets the final rows."""
    comm, rank, size = tmpi.world()
    if x0.shape[0] != size:
        raise ConfigError(f"x0 has {x0.shape[0]} rows but mpirun started {size} ranks")
    nb, probs = neighbor_probabilities(graph)[rank]
    g = tmpi.MpiGossip(comm, x0[rank], tracked=False, total=0, timeout=timeout_s)
    comm.Barrier()
    adpsgd.consensus_worker_main(LocalOutbox(), g, nb, probs, averages_per_worker,
                              seed * 1000 + rank)
    g.finish()
    out = torch.zeros_like(x0) if rank == 0 else None
    comm.Gather(g.x.contiguous(), out, root=0)
    return out


__all__ = ["run_mpi", "mpi_gossip_consensus", "exit_after_peers"]
