"""The modes under ``mpirun``: every rank calls :func:`apam_gossip.run`; rank 0 returns the
RunResult (same shape as the single-machine one), the other ranks return None.

* centralized: rank 0 is the master, ranks 1..N-1 are the workers (workers = size - 1);
* decentralized: every rank is a worker (workers = size); rank 0 also gathers snapshots of
  all models at the evaluation points (through the ranks' gossip servers, each model taken
  under its own lock) and scores them after training, so evaluation never slows training.

Each rank loads the data itself (ranks may be on different hosts) and computes the same
seeded partition. Worker ``i`` uses ``cuda:(local_rank mod n_gpus)`` when CUDA is present.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from .algorithms import adpsgd, apam
from .algorithms.common import (
    eval_points,
    initial_model,
    threads_per_worker,
    total_updates,
)
from .config import ConfigError, RunConfig
from .data import Dataset, partition
from .evaluate import Evaluator
from .result import EvalRecord, RunResult
from .transport import mpi as tmpi


class _Sink:
    """A stand-in for a control pipe: the algorithms' reports stay in this process."""

    def __init__(self, on_message=None) -> None:
        self.messages: list[Any] = []
        self.on_message = on_message

    def send(self, msg: Any) -> None:
        if self.on_message is None or not self.on_message(msg):
            self.messages.append(msg)

    def poll(self) -> bool:  # nothing arrives from a coordinator under MPI
        return False


class _Go:
    """``go.wait()`` for the gossip worker loop: under MPI a barrier already synchronised."""

    def wait(self, timeout: float | None = None) -> bool:
        return True


def _device(cfg: RunConfig, local: int) -> torch.device:
    if cfg.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def run_mpi(cfg: RunConfig, dataset: Dataset, cb, ckpt: dict | None = None) -> RunResult | None:
    comm, rank, size = tmpi.world()
    if cfg.mode == "sequential":
        if rank != 0:
            return None
        from .runner import _run_sequential

        return _run_sequential(cfg, dataset, cb)
    n = size - 1 if cfg.mode == "centralized" else size
    if n < 1:
        raise ConfigError("centralized mode over MPI needs at least 2 ranks (a master and a "
                          "worker): use mpirun -n 2 or more")
    cfg = cfg.replace(workers=n, transport="mpi")
    if len(cfg.slowdown) > n:
        raise ConfigError(f"slowdown has {len(cfg.slowdown)} entries but mpirun started "
                          f"{n} workers")
    lrank, on_node = tmpi.node_placement(comm)
    torch.set_num_threads(threads_per_worker(cfg, on_node))
    if cfg.mode == "centralized":
        return _centralized(cfg, dataset, cb, comm, rank, lrank, ckpt)
    if cfg.mode in ("allreduce", "dpsgd"):
        return _sync(cfg, dataset, cb, comm, rank, lrank)
    return _decentralized(cfg, dataset, cb, comm, rank, lrank)


def _centralized(cfg: RunConfig, dataset: Dataset, cb, comm, rank: int,
                 lrank: int, ckpt: dict | None = None) -> RunResult | None:
    """Rank 0 is the master. With ``cfg.checkpoint`` it writes checkpoints periodically:
    when a rank dies, OpenMPI ends the whole job (this MPI has no fault-tolerance
    extensions such as ULFM), so the last checkpoint is what survives; ``--resume`` it,
    under mpirun or on one machine."""
    resumes = int(ckpt["resumes"]) + 1 if ckpt is not None else 0
    if resumes:
        cfg_workers = cfg.replace(seed=cfg.seed + 1_000_003 * resumes)
    else:
        cfg_workers = cfg
    x0 = initial_model(cfg, dataset)
    shards = partition(dataset.y_train, cfg.workers, cfg.data.partition,
                       cfg.data.dirichlet_alpha, cfg.seed)
    total = total_updates(cfg, len(dataset.y_train))
    devices = comm.gather(str(_device(cfg, lrank)), root=0)
    if rank != 0:
        w = rank - 1
        end = tmpi.MpiStarWorker(comm, x0.numel())
        sink = _Sink()
        apam.worker_main(sink, end, cfg_workers, dataset, shards[w],
                         str(_device(cfg, lrank)))
        comm.send(sink.messages[-1][1], dest=0, tag=tmpi.T_STATS)
        comm.Barrier()
        return None

    from .runner import Event, centralized_result

    eval_at = eval_points(total, cfg.evals)
    snaps = torch.zeros(len(eval_at) + 1, x0.numel())
    total_samples = total * cfg.data.batch_size
    cb(Event("start", 0, total_samples))

    def live(msg) -> bool:
        if msg[0] == "progress":
            cb(Event("progress", msg[1], total_samples))
            return True
        return False

    sink = _Sink(live)
    end = tmpi.MpiStarMaster(comm, x0.numel(), timeout=cfg.timeout_s)
    checkpoint = None if cfg.checkpoint is None else {
        "path": cfg.checkpoint, "every_s": cfg.checkpoint_every_s,
        "config": cfg.replace(transport="auto").to_dict(), "resumes": resumes}
    apam.master_main(sink, end, x0, cfg.optim, total, eval_at, snaps, checkpoint, ckpt,
                     cfg.timeout_s)
    worker_stats = {}
    for r in range(1, comm.Get_size()):
        st = comm.recv(source=r, tag=tmpi.T_STATS)
        worker_stats[st["worker"]] = st
    comm.Barrier()
    # score the snapshots now that training is over (their wall times were taken live)
    evaluator = Evaluator(cfg.model, dataset, _device(cfg, lrank))
    evals: list[EvalRecord] = []
    summary: dict[str, Any] = {}
    final_params = None
    for msg in sink.messages:
        if msg[0] == "snap":
            _, j, wall, samples, updates, train_loss, final = msg
            if final:
                final_params = snaps[j].clone()
                if evals and evals[-1].updates == updates:
                    continue
            loss, acc = evaluator(snaps[j])
            rec = EvalRecord(wall, samples, updates, train_loss, loss, acc)
            evals.append(rec)
            cb(Event("eval", samples, total_samples, rec))
        elif msg[0] == "done":
            summary = msg[1]
    return centralized_result(cfg, summary, worker_stats, devices, evals, final_params,
                              x0.numel(), "mpi")


def _decentralized(cfg: RunConfig, dataset: Dataset, cb, comm, rank: int,
                   lrank: int) -> RunResult | None:
    from .topology import make_topology, neighbor_probabilities, validate_topology

    tmpi.require_thread_multiple("decentralized mode over MPI (a server thread serves "
                                 "averages beside the training thread)")
    if cfg.checkpoint is not None:
        raise ConfigError("checkpoints of the decentralized mode are written on one machine "
                          "only so far; under mpirun use --mode centralized or drop "
                          "--checkpoint")
    graph = validate_topology(make_topology(cfg.topology, cfg.workers, seed=cfg.seed),
                              cfg.workers)
    nb, probs = neighbor_probabilities(graph)[rank]
    x0 = initial_model(cfg, dataset)
    shards = partition(dataset.y_train, cfg.workers, cfg.data.partition,
                       cfg.data.dirichlet_alpha, cfg.seed)
    total = total_updates(cfg, len(dataset.y_train))
    total_samples = total * cfg.data.batch_size
    device = _device(cfg, lrank)
    g = tmpi.MpiGossip(comm, x0, cfg.adaptive_state == "tracked", total, cfg.timeout_s)
    g.go = _Go()
    points = [p for p in eval_points(total, cfg.evals) if p < total]

    monitor = None
    stop_monitor = threading.Event()
    snaps: list[tuple[float, int, torch.Tensor]] = []
    if rank == 0:
        from .runner import Event

        cb(Event("start", 0, total_samples))

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
                    cb(Event("progress", claimed * cfg.data.batch_size, total_samples))
                    stop_monitor.wait(0.01)

        monitor = threading.Thread(target=watch, name="gossip-monitor", daemon=True)

    comm.Barrier()  # every rank has its data, model and server up: the clock starts
    g.t0 = time.monotonic()
    if monitor is not None:
        monitor.start()
    sink = _Sink()
    try:
        adpsgd.worker_main(sink, g, cfg, dataset, shards[rank], str(device), nb, probs, total)
    finally:
        stop_monitor.set()
        if monitor is not None:
            monitor.join(timeout=cfg.timeout_s)
    g.finish()  # waits for every rank to finish; servers serve meanwhile
    wall = time.monotonic() - g.t0
    stats = next(m[1] for m in sink.messages if m[0] == "stats")
    stats["losses"] = list(g.losses)
    all_stats = comm.gather(stats, root=0)
    devices = comm.gather(str(device), root=0)
    xs = torch.zeros(cfg.workers, x0.numel()) if rank == 0 else None
    comm.Gather(g.x.contiguous(), xs, root=0)
    us = None
    if cfg.audit and g.u is not None:
        us = torch.zeros(cfg.workers, x0.numel()) if rank == 0 else None
        comm.Gather(g.u.contiguous(), us, root=0)
    if rank != 0:
        return None

    from .runner import AuditBase, Event, audit_errors, decentralized_result, gossip_eval_record

    evaluator = Evaluator(cfg.model, dataset, device)
    evals: list[EvalRecord] = []
    for wall_s, claimed, snap in snaps:
        rec, _ = gossip_eval_record(cfg, evaluator, snap, wall_s, claimed, None, 0)
        rec.extra.pop("averages")
        evals.append(rec)
        cb(Event("eval", rec.samples, total_samples, rec))
    stats_by = {s["worker"]: s for s in all_stats}
    loss_sum = sum(s["losses"][0] for s in all_stats)
    loss_n = sum(s["losses"][1] for s in all_stats)
    rec, xbar = gossip_eval_record(cfg, evaluator, xs, wall, total,
                                   loss_sum / loss_n if loss_n else None,
                                   sum(s["averages"] for s in all_stats))
    if cfg.audit:  # every rank started from x0, u = vhat = 0
        base = AuditBase.of(x0.expand(cfg.workers, -1),
                            torch.zeros(1, x0.numel()) if us is not None else None)
        rec.extra.update(audit_errors(base, xs, us, stats_by))
    evals.append(rec)
    cb(Event("eval", rec.samples, total_samples, rec))
    return decentralized_result(cfg, stats_by, wall, devices, evals, xbar, x0.numel(), "mpi")



def _sync(cfg: RunConfig, dataset: Dataset, cb, comm, rank: int,
          lrank: int) -> RunResult | None:
    """allreduce / dpsgd under mpirun: every rank is a worker; rank 0 reports."""
    from .algorithms import sync
    from .topology import make_topology, metropolis_hastings_weights, validate_topology

    n = cfg.workers
    x0 = initial_model(cfg, dataset)
    shards = partition(dataset.y_train, n, cfg.data.partition, cfg.data.dirichlet_alpha,
                       cfg.seed)
    rounds = max(1, -(-total_updates(cfg, len(dataset.y_train)) // n))
    total_samples = rounds * n * cfg.data.batch_size
    eval_at = eval_points(rounds, cfg.evals)
    weights, nbrs = None, []
    if cfg.mode == "dpsgd":
        graph = validate_topology(make_topology(cfg.topology, n, seed=cfg.seed), n)
        weights = metropolis_hastings_weights(graph)[rank]
        nbrs = [j for j, _ in weights if j != rank]
    device = _device(cfg, lrank)
    snaps = torch.zeros(len(eval_at) + 1, x0.numel())
    end = tmpi.MpiSync(comm, x0.numel(), nbrs, cfg.timeout_s)
    if rank == 0:
        from .runner import Event

        cb(Event("start", 0, total_samples))

    def live(msg) -> bool:
        if msg[0] == "progress" and rank == 0:
            from .runner import Event

            cb(Event("progress", msg[1], total_samples))
            return True
        return False

    sink = _Sink(live)
    sync.sync_worker_main(sink, end, cfg, dataset, shards[rank], str(device), x0, rounds,
                          eval_at, snaps, weights, nbrs)
    stats = next(m[1] for m in sink.messages if m[0] == "stats")
    all_stats = comm.gather(stats, root=0)
    devices = comm.gather(str(device), root=0)
    if rank != 0:
        return None
    from .result import WorkerStats
    from .runner import Event

    evaluator = Evaluator(cfg.model, dataset, device)
    evals: list[EvalRecord] = []
    final_params = None
    for msg in sink.messages:
        if msg[0] != "snap":
            continue
        _, j, wall, samples, k, train_loss, final, extra = msg
        loss, acc = evaluator(snaps[j])
        rec = EvalRecord(wall, samples, k, train_loss, loss, acc, extra=extra)
        if final:
            final_params = snaps[j].clone()
        evals.append(rec)
        cb(Event("eval", samples, total_samples, rec))
    by = {s["worker"]: s for s in all_stats}
    wall = max(s["wall_time"] for s in all_stats)
    workers = [WorkerStats(worker=i, device=devices[i], slowdown=cfg.slowdown_of(i),
                           updates=by[i]["updates"], samples=by[i]["samples"],
                           samples_per_s=by[i]["samples"] / wall if wall else 0.0,
                           compute_s=by[i]["compute_s"], sleep_s=by[i]["sleep_s"])
               for i in range(n)]
    return RunResult(config=cfg.to_dict(), mode=cfg.mode, transport="mpi",
                     n_params=x0.numel(), wall_time=wall, updates=rounds,
                     samples=sum(w.samples for w in workers), evals=evals,
                     staleness={0: rounds}, workers=workers, final_params=final_params)


def mpi_gossip_consensus(graph, x0: torch.Tensor, averages_per_worker: int, seed: int = 0,
                         timeout_s: float = 120.0) -> torch.Tensor | None:
    """The MPI twin of :func:`apam_gossip.algorithms.adpsgd.gossip_consensus`: call on
    every rank (rank r starts from row r of ``x0``); rank 0 gets the final rows."""
    import os

    import numpy as np

    from .topology import neighbor_probabilities

    comm, rank, size = tmpi.world()
    if x0.shape[0] != size:
        raise ConfigError(f"x0 has {x0.shape[0]} rows but mpirun started {size} ranks")
    nb, probs = neighbor_probabilities(graph)[rank]
    g = tmpi.MpiGossip(comm, x0[rank], tracked=False, total=0, timeout=timeout_s)
    rng = np.random.default_rng(seed * 1000 + rank)
    comm.Barrier()
    for _ in range(averages_per_worker if nb else 0):
        g.average_with(int(rng.choice(nb, p=np.asarray(probs) / sum(probs))))
        os.sched_yield()  # stands in for gradient time between averages
    g.finish()
    out = torch.zeros_like(x0) if rank == 0 else None
    comm.Gather(g.x.contiguous(), out, root=0)
    return out


__all__ = ["run_mpi", "mpi_gossip_consensus"]
