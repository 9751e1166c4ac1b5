"""The multi-process modes on one machine (shared-memory transport), as
:class:`~apam_gossip.coordinator.Mode` s: how each starts its processes, what its
messages mean, when it is finished and what it returns. The loop itself is
:class:`~apam_gossip.coordinator.Coordinator`'s.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from ..algorithms import adpsgd, apam, sync, syncps
from ..algorithms.apam import CheckpointSpec
from ..checkpoint import save_checkpoint
from ..config import RunConfig
from ..coordinator import UNSAVED_LOCKSTEP, Coordinator, RunInterrupted
from ..core.compress import gamma_for, parse_compress, wire_bytes
from ..evaluate import Evaluator
from ..messages import (
    PROGRESS_EVERY_S,
    Died,
    Hello,
    Interrupted,
    MasterSummary,
    Progress,
    Snapshot,
    StopRequest,
    WorkerReport,
)
from ..optim import Optimizer
from ..placement import device_for, eval_device, master_device, threads_per_worker
from ..plan import RunPlan, worker_config
from ..procs import ChildFailed, ProcessGroup
from ..reporting import (
    AuditBase,
    Callback,
    Event,
    SnapshotScorer,
    audit_errors,
    centralized_result,
    decentralized_result,
    gossip_eval_record,
    merge_counts,
    sync_result,
    syncps_result,
)
from ..result import EvalRecord, RunResult
from ..task import Task
from ..topology import neighbor_probabilities
from ..transport.shm import ShmGossip, ShmShardLinks, ShmStar, ShmSync
from .shards import MasterShards

LOCK_TIMEOUT_S = 120.0


def _worker_index(name: str) -> int:
    return int(name.split()[1])  # children are named "worker <i>"


def tolerate_workers(name: str) -> bool:
    """The asynchronous modes survive a worker's death by a signal (not the master's)."""
    return name.startswith("worker ")


class ShmMode:
    """What every mode on one machine sets up the same way: the plan, the data in shared
    memory (workers map it instead of each holding a copy), the evaluator, each worker's
    device and torch threads."""

    poll_s = 0.5
    tolerate = staticmethod(tolerate_workers)
    # what each message means: the name of the method that takes it (a table on the
    # class, not bound methods on the instance, so a mode is no reference cycle and its
    # shared memory and semaphores are freed as soon as the run drops it)
    HANDLERS: dict[type, str] = {Progress: "progress", WorkerReport: "report", Died: "died"}

    def __init__(self, cfg: RunConfig, task: Task, data: Any, cb: Callback) -> None:
        torch.set_num_threads(1)  # the coordinator only evaluates; leave cores to workers
        self.cfg, self.task, self.data, self.cb = cfg, task, data, cb
        self.plan = RunPlan.of(cfg, data, task)
        data.share_memory_()
        self.evaluator = Evaluator(task, data, eval_device(cfg), during=cfg.eval_samples)
        self.threads = threads_per_worker(cfg, cfg.workers)
        self.devices = [str(device_for(cfg, i)) for i in range(cfg.workers)]
        self.reports: dict[int, WorkerReport] = {}
        self.dead: set[int] = set()
        self.interrupted: Interrupted | None = None

    def start(self, group: ProcessGroup) -> None:
        raise NotImplementedError

    def handle(self, name: str, msg: Any) -> None:
        method = self.HANDLERS.get(type(msg))
        if method is None:
            raise AssertionError(f"unexpected message from {name}: {msg!r}")
        getattr(self, method)(name, msg)

    def tick(self) -> None:
        pass

    def finished(self) -> bool:
        raise NotImplementedError

    def finish(self) -> None:
        pass

    def request_stop(self) -> None:
        raise NotImplementedError

    def result(self) -> RunResult:
        raise NotImplementedError

    # the handlers every mode shares
    def progress(self, name: str, msg: Progress) -> None:
        self.cb(Event("progress", msg.samples, self.plan.total_samples))

    def report(self, name: str, msg: WorkerReport) -> None:
        self.reports[msg.worker] = msg

    def died(self, name: str, msg: Died) -> None:
        """A worker was killed; the run goes on without it."""
        self.dead.add(_worker_index(name))
        self.cb(Event("died", 0, self.plan.total_samples, None, f"{name} died ({msg.how})"))

    def all_reported(self) -> bool:
        return len(set(self.reports) | self.dead) >= self.cfg.workers


class CentralizedMode(ShmMode):
    """APAM: a master process and N worker processes (shared-memory star); with
    ``master_shards = K > 1``, K master processes (``master 0`` the leader), one star
    each over its slice of the model (see :mod:`apam_gossip.algorithms.apam`)."""

    HANDLERS = {**ShmMode.HANDLERS, Snapshot: "snapshot", MasterSummary: "summarize",
                Interrupted: "stopped"}

    def __init__(self, cfg: RunConfig, task: Task, data: Any, cb: Callback,
                 ckpt: dict[str, Any] | None = None) -> None:
        super().__init__(cfg, task, data, cb)
        self.ckpt = ckpt
        self.resumes = int(ckpt["resumes"]) + 1 if ckpt is not None else 0
        self.snaps = torch.zeros(len(self.plan.eval_at) + 1, self.plan.numel).share_memory_()
        self.scorer = SnapshotScorer(self.evaluator, self.snaps, self.plan.total_samples, cb)
        self.masters = MasterShards(cfg, self.plan.numel, self.plan.n_params, self.scorer,
                                    count=None if cfg.mode == "centralized" else 1)
        self.group: ProcessGroup | None = None
        # the transport lives as long as the mode: its semaphores and pipes must outlast
        # the children's start-up (spawn unpickles them in the child later)
        # the slots on the master's device (its GPU: device-to-device copies, CUDA IPC)
        self.master_device = master_device(cfg)
        self.stars = [ShmStar(cfg.workers, numel, device=self.master_device)
                      for numel in self.masters.numels]
        self.links = ShmShardLinks(self.masters.count) if self.masters.count > 1 else None

    def start(self, group: ProcessGroup) -> None:
        cfg, plan, m = self.cfg, self.plan, self.masters
        self.group = group
        checkpoint = None if cfg.checkpoint is None else CheckpointSpec(
            cfg.checkpoint, cfg.checkpoint_every_s, cfg.to_dict(), self.resumes)
        for k, star in enumerate(self.stars):
            group.start(m.names[k], apam.master_main,
                        (star.master_end(), plan.x0, cfg.optim, plan.total, plan.eval_at,
                         self.snaps, checkpoint, self.ckpt, cfg.timeout_s, plan.n_params,
                         self.master_device, m.shard(k),
                         self.links.link(k) if self.links else None), threads=1)
        wcfg = worker_config(cfg, self.resumes)
        for i in range(cfg.workers):
            group.start(f"worker {i}", apam.apam_worker_main,
                        (m.worker_end([star.worker_end(i) for star in self.stars]), wcfg,
                         self.task, self.data, plan.shards[i], self.devices[i]),
                        threads=self.threads)
        for star in self.stars:
            star.close_parent_copies()
        if self.links is not None:
            self.links.close_parent_copies()
        self.cb(Event("start", 0, plan.total_samples))

    def snapshot(self, name: str, msg: Snapshot) -> None:
        self.masters.snapshot(name, msg)

    def summarize(self, name: str, msg: MasterSummary) -> None:
        self.masters.summarize(name, msg)

    def stopped(self, name: str, msg: Interrupted) -> None:
        self.interrupted = self.masters.stopped(name, msg)

    def request_stop(self) -> None:
        assert self.group is not None
        try:
            self.group.send(self.masters.names[0], StopRequest())
        except (BrokenPipeError, OSError):
            pass  # the master has already ended: its summary is on the way

    def finished(self) -> bool:
        return self.interrupted is not None or (self.masters.summary is not None
                                                and self.all_reported())

    def result(self) -> RunResult:
        assert self.masters.summary is not None
        result = centralized_result(self.cfg, self.masters.summary, self.reports,
                                    self.devices, self.scorer, self.plan.n_params, "shm",
                                    failed=self.dead)
        return self.masters.annotate(result)


class DecentralizedMode(ShmMode):
    """AD-PSGD-style gossip: N worker processes, no master.

    The coordinator only watches: at each evaluation point it copies all workers' models
    at one instant (all locks, in order), and scores the average model x_bar (at the end,
    every worker's own model too); the consensus distance is mean_i |x_i - x_bar|^2.
    """

    poll_s = 0.02  # evaluation points are taken close to their update counts
    HANDLERS = {**ShmMode.HANDLERS, Hello: "ready"}

    def __init__(self, cfg: RunConfig, task: Task, data: Any, cb: Callback,
                 ckpt: dict[str, Any] | None = None) -> None:
        super().__init__(cfg, task, data, cb)
        plan = self.plan
        # each worker's model and optimizer state where it computes (its GPU: CUDA IPC)
        comp = parse_compress(cfg.compress)
        self.gossip = g = ShmGossip(cfg.workers, plan.numel,
                                    tracked=cfg.adaptive_state == "tracked",
                                    n_tracked=plan.n_params,
                                    devices=[torch.device(d) for d in self.devices],
                                    compress=comp, gamma=gamma_for(comp, cfg.compress_gamma),
                                    edges=list(plan.graph.edges()))
        g.x.copy_(plan.x0)  # every worker starts from the same model
        g.share_optimizer_state(Optimizer(cfg.optim).init(torch.zeros(plan.n_params)))
        self.resumes, self.wall_before = 0, 0.0
        self.done_before = torch.zeros(cfg.workers, dtype=g.done_by.dtype)
        self.staleness_before: dict[int, int] = {}  # the resumed runs' histogram
        self.points = [p for p in plan.eval_at if p < plan.total]  # the end is scored apart
        if ckpt is not None:  # continue where the checkpoint left off
            self.resumes, self.wall_before = int(ckpt["resumes"]) + 1, float(ckpt["wall_time"])
            self.done_before = ckpt["done_by"].clone()
            # checkpoints from before the histogram was kept: what came after the resume
            self.staleness_before = {int(k): int(v)
                                     for k, v in ckpt.get("staleness", {}).items()}
            g.x.copy_(ckpt["x"])
            if g.u is not None:
                g.u.copy_(ckpt["u"])
            for k, v in g.opt_state.items():
                v.copy_(ckpt["opt_state"][k])
            g.counters[0] = g.counters[1] = int(ckpt["completed"])
            g.counters[2] = int(ckpt["averages"])
            g.done_by.copy_(ckpt["done_by"])
            self.points = [p for p in self.points if p > int(ckpt["completed"])]
        # the edges' public copies: a checkpoint's, else the models the workers start from
        g.start_public(ckpt.get("public") if ckpt is not None else None,
                       ckpt.get("public_edges") if ckpt is not None else None)
        # the audit starts from the models the workers start from (the checkpoint's)
        self.audit_base = AuditBase.of(
            g.x.clone(), g.u.clone() if g.u is not None else None,
            g.opt_state["vhat"].clone() if "vhat" in g.opt_state else None) if cfg.audit \
            else None
        self.hello: set[int] = set()
        self.dead_at_start: set[int] = set()
        self.t0 = 0.0
        self.evals: list[EvalRecord] = []
        self.last_loss = torch.zeros(cfg.workers, 2, dtype=torch.float64)
        self.last_ckpt = self.last_progress = time.monotonic()
        self.stopping = False
        self.final_params: torch.Tensor | None = None

    def start(self, group: ProcessGroup) -> None:
        cfg, plan = self.cfg, self.plan
        wcfg = worker_config(cfg, self.resumes)
        for i in range(cfg.workers):
            nb, p = plan.neighbors(i)
            group.start(f"worker {i}", adpsgd.gossip_worker_main,
                        (self.gossip.end(i, LOCK_TIMEOUT_S, nb), wcfg, self.task, self.data,
                         plan.shards[i], self.devices[i], nb, p, plan.total),
                        threads=self.threads)
        self.cb(Event("start", 0, plan.total_samples))

    def ready(self, name: str, msg: Hello) -> None:
        self.hello.add(msg.worker)
        self.start_when_all_accounted_for()

    def start_when_all_accounted_for(self) -> None:
        """Start the clock and the workers once every worker has said hello or died.

        A worker that died before its hello never sends one: waiting for all hellos
        stalled the run until the workers' start timeout and then failed it (issue 19),
        where a worker killed mid-run costs nothing. It is counted out instead; it was
        marked dead (:meth:`died`) before the others start, so none ever picks it."""
        if self.gossip.go.is_set():
            return
        if len(self.hello | self.dead) == self.cfg.workers:  # all ready: the clock starts
            self.t0 = time.monotonic() - self.wall_before
            self.gossip.go.set()

    def died(self, name: str, msg: Died) -> None:
        """Its neighbors stop choosing it and the locks it held are freed; one that died
        during start-up is no longer waited for."""
        super().died(name, msg)
        if not self.gossip.go.is_set():  # never trained nor averaged: the audit holds
            self.dead_at_start.add(_worker_index(name))
        self.gossip.recover(_worker_index(name))
        if len(self.dead) == self.cfg.workers:
            raise ChildFailed("workers", "all workers died")
        self.start_when_all_accounted_for()

    def tick(self) -> None:
        if not self.gossip.go.is_set() or self.stopping:
            return
        now = time.monotonic()
        if self.cfg.checkpoint is not None and now - self.last_ckpt > self.cfg.checkpoint_every_s:
            self.save()
            self.last_ckpt = time.monotonic()
        done = int(self.gossip.counters[1])
        if self.points and self.points[0] <= done:
            self.evaluate(now - self.t0, per_worker=False)
            while self.points and self.points[0] <= done:
                self.points.pop(0)
        elif now - self.last_progress > PROGRESS_EVERY_S:
            total = self.plan.total_samples
            self.cb(Event("progress", done * self.cfg.data.batch_size, total))
            self.last_progress = now

    def request_stop(self) -> None:
        self.gossip.stop[0] = 1  # workers finish their current update and exit
        self.stopping = True

    def finished(self) -> bool:
        return self.all_reported()

    def finish(self) -> None:
        if self.stopping:  # every worker has stopped: the copy is consistent
            if self.cfg.checkpoint is not None:
                self.save()
            self.interrupted = Interrupted(self.cfg.checkpoint, int(self.gossip.counters[1]))
        else:
            wall = max(r.finished_at for r in self.reports.values()) - self.t0
            self.final_params = self.evaluate(wall)

    def save(self) -> None:
        # models, optimizer states and counters all from one instant (under every lock)
        c = self.gossip.consistent_copy(LOCK_TIMEOUT_S, with_opt_state=True)
        save_checkpoint(self.cfg.checkpoint, {
            "config": self.cfg.to_dict(), "mode": "decentralized", "x": c.x, "u": c.u,
            "opt_state": c.opt_state, "completed": c.completed, "averages": c.averages,
            "done_by": c.done_by, "wall_time": time.monotonic() - self.t0,
            "resumes": self.resumes,
            # the whole run's, as its counts are: the resumed runs' and this one's so far
            "staleness": merge_counts(self.staleness_before, c.staleness_counts()),
            **({"public": c.public, "public_edges": self.gossip.edges_key()}
               if c.public is not None else {}),
        })

    def evaluate(self, wall: float, per_worker: bool = True) -> torch.Tensor:
        """Score the models now (the living workers'); returns the average model.

        During the run only the average model is scored (``per_worker=False``); each
        worker's own model is scored at the end too. Scoring all n models at every point
        cost more CPU than the training itself on a small machine, so the coordinator fell
        behind and skipped points (9 of 32 taken at 8 workers)."""
        c = self.gossip.consistent_copy(LOCK_TIMEOUT_S)
        xs = c.x
        if self.dead:
            xs = xs[[i for i in range(self.cfg.workers) if i not in self.dead]]
        losses = self.gossip.losses.clone()
        d = losses - self.last_loss
        self.last_loss = losses
        train_loss = float(d[:, 0].sum() / d[:, 1].sum()) if d[:, 1].sum() > 0 else None
        rec, xbar = gossip_eval_record(self.cfg, self.evaluator, xs, wall, c.completed,
                                       train_loss, c.averages, per_worker)
        self.evals.append(rec)
        self.cb(Event("eval", rec.samples, self.plan.total_samples, rec))
        return xbar

    def result(self) -> RunResult:
        cfg = self.cfg
        wall = max(r.finished_at for r in self.reports.values()) - self.t0
        # a death mid-average breaks the audit; one before the start changed nothing
        if self.audit_base is not None and not self.dead - self.dead_at_start:
            u = self.gossip.u
            self.evals[-1].extra.update(audit_errors(self.audit_base, self.gossip.x.clone(),
                                                     u.clone() if u is not None else None,
                                                     self.reports))
        self.evals[-1].extra["bytes_per_average"] = float(
            wire_bytes(cfg, self.plan.numel, self.plan.n_params))
        # a resumed run's counts are the whole run's, as its evaluations and wall time
        # are: what each worker did before the checkpoint, plus since
        bs = cfg.data.batch_size
        for w, rep in list(self.reports.items()):
            n = int(self.done_before[w])
            if n and w not in self.dead:
                self.reports[w] = replace(rep, updates=rep.updates + n,
                                          samples=rep.samples + n * bs)
        staleness = dict(self.staleness_before)
        for w in self.dead:  # what it did before it died (its histogram is in the shm)
            n = int(self.gossip.done_by[w])
            hist = {k: int(v) for k, v in enumerate(self.gossip.staleness[w].tolist()) if v}
            self.reports[w] = WorkerReport(w, self.devices[w], 0.0, 0.0, updates=n,
                                           samples=n * bs, staleness=hist)
        return decentralized_result(cfg, self.reports, wall, self.devices, self.evals,
                                    self.final_params, self.plan.n_params, "shm",
                                    failed=self.dead, staleness_before=staleness)


class SyncMode(ShmMode):
    """The synchronous baselines (allreduce, dpsgd): N worker processes in lockstep.

    The budget is the same number of gradients as the asynchronous modes, in rounds of
    one gradient per worker: rounds = ceil(total updates / workers)."""

    tolerate = staticmethod(lambda name: False)  # a lost worker stalls every round
    HANDLERS = {**ShmMode.HANDLERS, Snapshot: "snapshot"}

    def __init__(self, cfg: RunConfig, task: Task, data: Any, cb: Callback) -> None:
        super().__init__(cfg, task, data, cb)
        self.snaps = torch.zeros(len(self.plan.eval_at) + 1, self.plan.numel).share_memory_()
        self.scorer = SnapshotScorer(self.evaluator, self.snaps, self.plan.total_samples, cb)
        # outlasts the children's start; each slot on its worker's device
        self.sync = ShmSync(cfg.workers, self.plan.numel,
                            devices=[torch.device(d) for d in self.devices])

    def snapshot(self, name: str, msg: Snapshot) -> None:
        self.scorer(msg)

    def start(self, group: ProcessGroup) -> None:
        cfg, plan, state = self.cfg, self.plan, self.sync
        for i in range(cfg.workers):
            weights, nbrs = plan.mixing(i)
            group.start(f"worker {i}", sync.sync_worker_main,
                        (state.end(i, cfg.timeout_s), cfg, self.task, self.data, plan.shards[i],
                         self.devices[i], plan.x0, plan.rounds, plan.eval_at, self.snaps,
                         weights, nbrs), threads=self.threads)
        self.cb(Event("start", 0, plan.total_samples))

    def finished(self) -> bool:
        return self.all_reported()

    def request_stop(self) -> None:  # no checkpoints in lockstep modes: stop at once
        raise RunInterrupted(None, max((r.updates for r in self.reports.values()), default=0),
                             UNSAVED_LOCKSTEP)

    def result(self) -> RunResult:
        return sync_result(self.cfg, self.reports, self.devices, self.scorer,
                           self.plan.rounds, self.plan.n_params, "shm")


class SyncPsMode(CentralizedMode):
    """syncps, the synchronous parameter server: a master process and N worker processes
    on the shared-memory star (as APAM's), in lockstep: every step the master waits for
    all N gradients (worker i on its share of the global batch), takes one optimizer step
    and sends the model to all (see :mod:`apam_gossip.algorithms.syncps`)."""

    tolerate = staticmethod(lambda name: False)  # a lost worker stalls every step

    def __init__(self, cfg: RunConfig, task: Task, data: Any, cb: Callback) -> None:
        super().__init__(cfg, task, data, cb)
        self.updates = 0  # the master's steps so far, as its progress says

    def start(self, group: ProcessGroup) -> None:
        cfg, plan, star = self.cfg, self.plan, self.stars[0]
        self.group = group
        group.start("master", syncps.syncps_master_main,
                    (star.master_end(), plan.x0, cfg.optim, plan.total, plan.eval_at,
                     self.snaps, plan.n_params, cfg.timeout_s, self.master_device),
                    threads=1)
        for i in range(cfg.workers):
            group.start(f"worker {i}", syncps.syncps_worker_main,
                        (star.worker_end(i), cfg, self.task, self.data, plan.shards[i],
                         self.devices[i]), threads=self.threads)
        star.close_parent_copies()
        self.cb(Event("start", 0, plan.total_samples))

    def progress(self, name: str, msg: Progress) -> None:
        self.updates = msg.updates
        super().progress(name, msg)

    def request_stop(self) -> None:  # no checkpoints in lockstep modes: stop at once
        raise RunInterrupted(None, self.updates, UNSAVED_LOCKSTEP)

    def result(self) -> RunResult:
        assert self.masters.summary is not None
        return syncps_result(self.cfg, self.masters.summary, self.reports, self.devices,
                             self.scorer, self.plan.n_params, "shm")


class ConsensusMode:
    """Gossip with no gradients (learning rate 0): ``averages`` pairwise averages per
    worker from the rows of ``x0`` ([n, d]) on ``graph``; for tests and benchmarks of the
    averaging itself. Pairwise averaging is doubly stochastic, so the mean of the rows is
    conserved and the rows converge to it."""

    poll_s = 0.2
    interrupted = None

    def __init__(self, graph, x0: torch.Tensor, averages: int, seed: int,
                 lock_timeout: float) -> None:
        self.n = x0.shape[0]
        self.gossip = ShmGossip(self.n, x0.shape[1], dtype=x0.dtype)
        self.gossip.x.copy_(x0)
        self.nbp = neighbor_probabilities(graph)
        self.averages, self.seed, self.lock_timeout = averages, seed, lock_timeout
        self.hello: set[int] = set()
        self.done: set[int] = set()

    def start(self, group: ProcessGroup) -> None:
        for i in range(self.n):
            nb, p = self.nbp[i]
            group.start(f"worker {i}", adpsgd.consensus_worker_main,
                        (self.gossip.end(i, self.lock_timeout, nb), nb, p, self.averages,
                         self.seed * 1000 + i))

    def handle(self, name: str, msg: Any) -> None:
        if isinstance(msg, Hello):
            self.hello.add(msg.worker)
            if len(self.hello) == self.n:
                self.gossip.go.set()
        elif isinstance(msg, WorkerReport):
            self.done.add(msg.worker)
        else:
            raise AssertionError(f"unexpected message from {name}: {msg!r}")

    def tick(self) -> None:
        pass

    def finished(self) -> bool:
        return len(self.done) == self.n

    def finish(self) -> None:
        pass

    def request_stop(self) -> None:
        raise RunInterrupted(None, 0, UNSAVED_LOCKSTEP)


def run_mode(mode: Any, timeout_s: float) -> None:
    """Start ``mode``'s processes and coordinate them to the end (always reaped)."""
    with ProcessGroup(tolerate=getattr(mode, "tolerate", None)) as group:
        mode.start(group)
        Coordinator(group, mode, timeout_s).run()


def gossip_consensus(graph, x0: torch.Tensor, averages_per_worker: int, seed: int = 0,
                     timeout_s: float = 120.0) -> torch.Tensor:
    """Run real gossip processes on ``graph`` from the rows of ``x0`` with no gradient
    steps (see :class:`ConsensusMode`); returns the final rows."""
    mode = ConsensusMode(graph, x0, averages_per_worker, seed, timeout_s)
    run_mode(mode, timeout_s)
    return mode.gossip.x.clone()


__all__ = ["CentralizedMode", "DecentralizedMode", "SyncMode", "SyncPsMode", "ConsensusMode",
           "run_mode", "gossip_consensus"]
