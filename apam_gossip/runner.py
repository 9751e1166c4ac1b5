"""``run(config) -> RunResult``: the single entry point that drives every mode.

The calling process is the coordinator: it loads the data once (into shared memory, so
workers do not each hold a copy), starts the processes of the chosen mode, evaluates the
snapshots they report while they keep training, and always reaps them, also on errors,
Ctrl-C and timeouts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .algorithms import adpsgd, apam, sync
from .algorithms.common import (
    LocalWorker,
    device_for,
    eval_points,
    initial_model,
    threads_per_worker,
    total_updates,
)
from .config import ConfigError, RunConfig
from .data import Dataset, load_dataset, partition
from .evaluate import Evaluator
from .procs import ChildFailed, ProcessGroup
from .result import EvalRecord, RunResult, WorkerStats
from .transport.shm import ShmGossip, ShmStar, ShmSync


class RunTimeout(RuntimeError):
    """The run exceeded ``config.timeout_s``."""


class RunInterrupted(RuntimeError):
    """SIGTERM/SIGINT stopped the run; ``checkpoint`` is where it was saved (or None)."""

    def __init__(self, checkpoint: str | None, updates: int) -> None:
        where = (f"checkpoint written to {checkpoint}; continue with --resume {checkpoint}"
                 if checkpoint else "no --checkpoint was given, so nothing was saved")
        super().__init__(f"run interrupted after {updates} updates; {where}")
        self.checkpoint = checkpoint


@dataclass
class Event:
    """Progress notifications for a UI: ``kind`` is "start", "progress", "eval" or "died"
    (a worker process died and the run goes on without it; ``message`` says which)."""

    kind: str
    samples: int = 0
    total_samples: int = 0
    record: EvalRecord | None = None
    message: str = ""


Callback = Callable[[Event], None]


def run(config: RunConfig, *, dataset: Dataset | None = None,
        callback: Callback | None = None, resume: str | None = None) -> RunResult | None:
    """Train as ``config`` says and return the :class:`RunResult`.

    Under ``mpirun`` (``transport`` ``auto`` or ``mpi``) every rank calls this; rank 0
    returns the RunResult and the other ranks return None.

    ``dataset`` skips loading (tests, repeated runs); ``callback`` receives
    :class:`Event` s for progress display.

    ``resume``: a checkpoint written by ``config.checkpoint`` (centralized mode); the run
    continues from it with the checkpoint's config. SIGTERM or SIGINT during a centralized
    run makes the master write its checkpoint and stop: :class:`RunInterrupted`.
    """
    ckpt = None
    if resume is not None:
        from .checkpoint import load_checkpoint

        ckpt = load_checkpoint(resume)
        config = RunConfig.from_dict(ckpt["config"])
    config.validate()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was requested but torch.cuda.is_available() is False; "
                          "use --device auto or cpu")
    if dataset is None:
        dataset = load_dataset(config.data.dataset, config.data.data_dir)
    dataset = dataset.subset(config.data.train_limit, config.data.test_limit)
    if config.workers > len(dataset.y_train):
        raise ConfigError(f"workers ({config.workers}) exceeds the {len(dataset.y_train)} "
                          "training samples")
    cb = callback or (lambda e: None)
    old_threads = torch.get_num_threads()
    if resolve_transport(config) == "mpi":
        from .runner_mpi import run_mpi

        try:
            return run_mpi(config, dataset, cb, ckpt)
        finally:
            torch.set_num_threads(old_threads)
    try:
        if config.mode == "sequential":
            return _run_sequential(config, dataset, cb)
        if config.mode == "centralized":
            return _run_centralized(config, dataset, cb, ckpt)
        if config.mode == "decentralized":
            return _run_decentralized(config, dataset, cb, ckpt)
        if config.mode in ("allreduce", "dpsgd"):
            return _run_sync(config, dataset, cb)
        raise AssertionError(f"unhandled mode {config.mode!r}")
    finally:
        torch.set_num_threads(old_threads)


def check_runnable(cfg: RunConfig) -> None:
    """Raise the :class:`ConfigError` a run of ``cfg`` would raise at its start, without
    starting it (``compare`` and ``bench`` check every mode before the first run)."""
    cfg.validate()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was requested but torch.cuda.is_available() is False; "
                          "use --device auto or cpu")
    if cfg.mode in ("decentralized", "dpsgd") and cfg.transport != "mpi":
        from .topology import make_topology, validate_topology

        validate_topology(make_topology(cfg.topology, cfg.workers, seed=cfg.seed), cfg.workers)
    resolve_transport(cfg)


def resolve_transport(cfg: RunConfig) -> str:
    """``shm`` or ``mpi``: ``auto`` picks MPI when started by mpirun with more than one rank."""
    from .transport.mpi import launched_by_mpi

    if cfg.transport == "mpi":
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            raise ConfigError("transport mpi needs mpi4py: pip install 'apam_gossip[mpi]'") \
                from None
        return "mpi"
    if launched_by_mpi():
        from .transport.mpi import world

        size = world()[2]
        if size > 1 and cfg.transport == "shm":
            raise ConfigError(f"transport shm under mpirun with {size} ranks would start "
                              f"{size} separate runs; use --transport auto or mpi, or run "
                              "without mpirun")
        return "mpi" if size > 1 else "shm"
    return "shm"


def _eval_device(cfg: RunConfig) -> torch.device:
    return torch.device("cuda", 0) if cfg.device != "cpu" and torch.cuda.is_available() \
        else torch.device("cpu")


def _run_sequential(cfg: RunConfig, dataset: Dataset, cb: Callback) -> RunResult:
    """Plain sequential training with the same optimizer, data and seed (the reference).

    Evaluation pauses the clock, so ``wall_time`` is training time only.
    """
    torch.set_num_threads(threads_per_worker(cfg, 1))
    x0 = initial_model(cfg, dataset)
    (shard,) = partition(dataset.y_train, 1, cfg.data.partition, cfg.data.dirichlet_alpha,
                         cfg.seed)
    w = LocalWorker.build(cfg, dataset, shard, 0, device_for(cfg, 0))
    w.flat.params.copy_(x0)
    opt = cfg.optim.build()
    state = opt.init(w.flat.params)
    evaluator = Evaluator(cfg.model, dataset, _eval_device(cfg))
    total = total_updates(cfg, len(dataset.y_train))
    points = set(eval_points(total, cfg.evals))
    evals: list[EvalRecord] = []
    train_time, samples, loss_sum, loss_n = 0.0, 0, 0.0, 0
    cb(Event("start", 0, total * cfg.data.batch_size))
    last_progress = time.monotonic()

    def evaluate(k: int) -> None:
        nonlocal loss_sum, loss_n
        loss, acc = evaluator(w.flat.params)
        rec = EvalRecord(train_time, samples, k, loss_sum / loss_n if loss_n else None, loss, acc)
        evals.append(rec)
        loss_sum, loss_n = 0.0, 0
        cb(Event("eval", samples, total * cfg.data.batch_size, rec))

    evaluate(0)
    for k in range(1, total + 1):
        t = time.perf_counter()
        loss, n, _ = w.gradient()
        opt.update(w.flat.params, w.flat.grads, state, lr=opt.lr_at(k, total))
        train_time += time.perf_counter() - t
        samples += n
        loss_sum += loss
        loss_n += 1
        if k in points:
            evaluate(k)
        elif time.monotonic() - last_progress > 0.25:
            cb(Event("progress", samples, total * cfg.data.batch_size))
            last_progress = time.monotonic()
    stats = WorkerStats(0, str(w.device), w.slowdown, total, samples,
                        samples / train_time if train_time else 0.0, w.compute_s, w.sleep_s)
    return RunResult(
        config=cfg.to_dict(), mode="sequential", transport="none", n_params=w.flat.numel,
        wall_time=train_time, updates=total, samples=samples, evals=evals, staleness={0: total},
        workers=[stats], final_params=w.flat.params.detach().cpu().clone(),
    )


class _SignalStop:
    """While active (a context manager, main thread only), SIGTERM and SIGINT set ``flag``
    instead of killing the coordinator, so the run can checkpoint and stop in order."""

    def __init__(self) -> None:
        self.flag = False
        self.sent = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.flag:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.flag = True

    def __enter__(self) -> _SignalStop:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class _Shared:
    """What every multi-process mode sets up the same way before starting workers."""

    x0: torch.Tensor
    numel: int
    shards: list[torch.Tensor]
    total: int  # budget in updates
    samples: int  # budget in samples
    evaluator: Evaluator
    threads: int
    devices: list[str]

    @classmethod
    def prepare(cls, cfg: RunConfig, dataset: Dataset) -> _Shared:
        torch.set_num_threads(1)  # the coordinator only evaluates; leave cores to workers
        x0 = initial_model(cfg, dataset)
        shards = partition(dataset.y_train, cfg.workers, cfg.data.partition,
                           cfg.data.dirichlet_alpha, cfg.seed)
        dataset.share_memory_()  # workers map the data instead of each holding a copy
        total = total_updates(cfg, len(dataset.y_train))
        return cls(x0, x0.numel(), shards, total, total * cfg.data.batch_size,
                   Evaluator(cfg.model, dataset, _eval_device(cfg)),
                   threads_per_worker(cfg, cfg.workers),
                   [str(device_for(cfg, i)) for i in range(cfg.workers)])


def _run_centralized(cfg: RunConfig, dataset: Dataset, cb: Callback,
                     ckpt: dict[str, Any] | None = None) -> RunResult:
    """APAM over the shared-memory transport: a master process and N worker processes."""
    sh = _Shared.prepare(cfg, dataset)
    x0, numel, shards, total, total_samples = sh.x0, sh.numel, sh.shards, sh.total, sh.samples
    evaluator, tpw, devices = sh.evaluator, sh.threads, sh.devices
    eval_at = eval_points(total, cfg.evals)
    snaps = torch.zeros(len(eval_at) + 1, numel).share_memory_()
    star = ShmStar(cfg.workers, numel)

    evals: list[EvalRecord] = []
    worker_stats: dict[int, dict[str, Any]] = {}
    summary: dict[str, Any] | None = None
    final_params = None
    dead: set[int] = set()
    resumes = int(ckpt["resumes"]) + 1 if ckpt is not None else 0
    checkpoint = None if cfg.checkpoint is None else {
        "path": cfg.checkpoint, "every_s": cfg.checkpoint_every_s, "config": cfg.to_dict(),
        "resumes": resumes}
    # after a resume the workers draw a fresh seeded data order (see apam_gossip.checkpoint)
    wcfg = cfg.replace(seed=cfg.seed + 1_000_003 * resumes) if resumes else cfg
    stop_requested = _SignalStop()
    with ProcessGroup(tolerate=lambda name: name.startswith("worker ")) as group, \
            stop_requested:
        group.start("master", apam.master_main,
                    (star.master_end(), x0, cfg.optim, total, eval_at, snaps, checkpoint, ckpt,
                     cfg.timeout_s),
                    threads=1)
        for i in range(cfg.workers):
            group.start(f"worker {i}", apam.worker_main,
                        (star.worker_end(i), wcfg, dataset, shards[i], devices[i]),
                        threads=tpw)
        star.close_parent_copies()
        cb(Event("start", 0, total_samples))
        deadline = time.monotonic() + cfg.timeout_s
        while summary is None or len(worker_stats) + len(dead - set(worker_stats)) \
                < cfg.workers:
            if stop_requested.flag and not stop_requested.sent:
                group.send("master", ("stop",))
                stop_requested.sent = True
            if time.monotonic() > deadline:
                raise RunTimeout(f"run exceeded timeout_s={cfg.timeout_s:g} s; still running: "
                                 f"{', '.join(group.alive()) or 'none'}")
            for name, msg in group.poll(0.5):
                kind = msg[0]
                if kind == "snap":
                    _, j, wall, samples, updates, train_loss, final = msg
                    loss, acc = evaluator(snaps[j])
                    rec = EvalRecord(wall, samples, updates, train_loss, loss, acc)
                    if final:
                        final_params = snaps[j].clone()
                        if evals and evals[-1].updates == updates:
                            continue  # the last eval point already scored this model
                    evals.append(rec)
                    cb(Event("eval", samples, total_samples, rec))
                elif kind == "progress":
                    cb(Event("progress", msg[1], total_samples))
                elif kind == "done":
                    summary = msg[1]
                elif kind == "stats":
                    worker_stats[msg[1]["worker"]] = msg[1]
                elif kind == "interrupted":
                    group.join(10.0)
                    raise RunInterrupted(msg[1], msg[2])
                elif kind == "died":  # the master drops it; the run goes on
                    dead.add(int(name.split()[1]))
                    cb(Event("died", 0, total_samples, None, f"{name} died ({msg[1]})"))
                else:
                    raise AssertionError(f"unexpected message from {name}: {msg!r}")
        if not group.join(30.0):
            raise ChildFailed(", ".join(group.alive()), "did not exit after the run finished")

    for i in dead:
        worker_stats.setdefault(i, {"compute_s": 0.0, "sleep_s": 0.0})
    result = centralized_result(cfg, summary, worker_stats, devices, evals, final_params,
                                numel, "shm")
    result.failed_workers = sorted(dead | set(summary.get("failed_workers", [])))
    return result


def centralized_result(cfg: RunConfig, summary: dict[str, Any],
                       worker_stats: dict[int, dict[str, Any]], devices: list[str],
                       evals: list[EvalRecord], final_params: torch.Tensor | None, numel: int,
                       transport: str) -> RunResult:
    """Assemble a centralized RunResult from the master's summary and workers' stats."""
    wall = summary["wall_time"]
    workers = [
        WorkerStats(
            worker=i, device=devices[i], slowdown=cfg.slowdown_of(i),
            updates=summary["updates_of"][i], samples=summary["samples_of"][i],
            samples_per_s=summary["samples_of"][i] / wall if wall else 0.0,
            compute_s=worker_stats[i]["compute_s"], sleep_s=worker_stats[i]["sleep_s"],
        )
        for i in range(cfg.workers)
    ]
    return RunResult(
        config=cfg.to_dict(), mode="centralized", transport=transport, n_params=numel,
        wall_time=wall, updates=summary["updates"], samples=summary["samples"], evals=evals,
        staleness={int(k): v for k, v in summary["staleness"].items()}, workers=workers,
        final_params=final_params,
    )


def gossip_eval_record(cfg: RunConfig, evaluator: Evaluator, xs: torch.Tensor, wall: float,
                       done: int, train_loss: float | None, averages: int) -> tuple[
                           EvalRecord, torch.Tensor]:
    """Score the average model x_bar and each worker's model; returns (record, x_bar)."""
    xbar = xs.mean(0)
    consensus = float(((xs - xbar) ** 2).sum(1).mean())
    loss, acc = evaluator(xbar)
    # each worker's own model on a slice of the test set: n full evaluations per point
    # would steal the workers' CPU on a small machine
    n_test = min(WORKER_EVAL_SAMPLES, len(evaluator.y))
    accs = [evaluator(xs[i], limit=n_test)[1] for i in range(len(xs))] if len(xs) > 1 \
        else [acc]
    rec = EvalRecord(wall, done * cfg.data.batch_size, done, train_loss, loss, acc, extra={
        "consensus_distance": consensus, "worst_worker_acc": min(accs),
        "mean_worker_acc": sum(accs) / len(accs), "averages": averages,
        "worker_eval_samples": n_test,
    })
    return rec, xbar


def decentralized_result(cfg: RunConfig, stats: dict[int, dict[str, Any]], wall: float,
                         devices: list[str], evals: list[EvalRecord],
                         final_params: torch.Tensor | None, numel: int,
                         transport: str) -> RunResult:
    """Assemble a decentralized RunResult from the workers' stats."""
    staleness: dict[int, int] = {}
    for s in stats.values():
        for k, v in s["staleness"].items():
            staleness[int(k)] = staleness.get(int(k), 0) + v
    workers = [
        WorkerStats(
            worker=i, device=devices[i], slowdown=cfg.slowdown_of(i),
            updates=stats[i]["updates"], samples=stats[i]["samples"],
            samples_per_s=stats[i]["samples"] / wall if wall else 0.0,
            compute_s=stats[i]["compute_s"], sleep_s=stats[i]["sleep_s"],
        )
        for i in range(cfg.workers)
    ]
    return RunResult(
        config=cfg.to_dict(), mode="decentralized", transport=transport, n_params=numel,
        wall_time=wall, updates=sum(w.updates for w in workers),
        samples=sum(w.samples for w in workers), evals=evals, staleness=staleness,
        workers=workers, final_params=final_params,
    )


@dataclass
class AuditBase:
    """The starting point of ``--audit``: sum_i x_i and, with a tracked second moment,
    sum_i (u_i - vhat_i), in float64 (see :mod:`apam_gossip.algorithms.adpsgd`)."""

    x_sum: torch.Tensor
    u_minus_vhat: torch.Tensor | None = None

    @classmethod
    def of(cls, xs: torch.Tensor, us: torch.Tensor | None = None,
           vhats: torch.Tensor | None = None) -> AuditBase:
        uv = None
        if us is not None:
            uv = us.double().sum(0) - (vhats.double().sum(0) if vhats is not None else 0.0)
        return cls(xs.double().sum(0), uv)


def audit_errors(base: AuditBase, xs: torch.Tensor, us: torch.Tensor | None,
                 stats: dict[int, dict[str, Any]]) -> dict[str, float]:
    """Relative errors of the gossip invariants at the end of a run (see --audit):
    ``audit_error``: sum_i x_i(end) vs the start plus every local step; with a tracked u,
    ``audit_u_error``: sum_i (u_i - vhat_i)(end) vs the start."""
    steps = sum(torch.from_numpy(s["audit"]) for s in stats.values())
    expect = base.x_sum + steps
    out = {"audit_error": float((xs.double().sum(0) - expect).norm() / expect.norm())}
    if us is not None and base.u_minus_vhat is not None:
        vhats = torch.stack([torch.from_numpy(s["audit_vhat"]) for s in stats.values()])
        u_sum = us.double().sum(0)
        err = (u_sum - vhats.sum(0) - base.u_minus_vhat).norm() / u_sum.norm().clamp(min=1e-300)
        out["audit_u_error"] = float(err)
        # how far apart the workers' u (gossiped) and vhat (private) are: mixing makes
        # u_spread much smaller than vhat_spread
        out["u_spread"] = _spread(us.double())
        out["vhat_spread"] = _spread(vhats)
    return out


def _spread(rows: torch.Tensor) -> float:
    """mean_i |r_i - mean r|^2 / |mean r|^2."""
    mean = rows.mean(0)
    return float(((rows - mean) ** 2).sum(1).mean() / (mean**2).sum().clamp(min=1e-300))


LOCK_TIMEOUT_S = 120.0
WORKER_EVAL_SAMPLES = 2000  # test samples used to score each worker's own model


def _run_decentralized(cfg: RunConfig, dataset: Dataset, cb: Callback,
                       ckpt: dict[str, Any] | None = None) -> RunResult:
    """AD-PSGD-style gossip over the shared-memory transport: N worker processes, no master.

    The coordinator (this process) only watches: at each evaluation point it copies all
    workers' models at one instant (all locks, in order), and scores the average model
    x_bar and every worker's own model; the consensus distance is mean_i |x_i - x_bar|^2.
    """
    from .topology import make_topology, neighbor_probabilities, validate_topology

    graph = validate_topology(make_topology(cfg.topology, cfg.workers, seed=cfg.seed),
                              cfg.workers)
    nbp = neighbor_probabilities(graph)
    sh = _Shared.prepare(cfg, dataset)
    x0, numel, shards, total, total_samples = sh.x0, sh.numel, sh.shards, sh.total, sh.samples
    evaluator, tpw, devices = sh.evaluator, sh.threads, sh.devices
    points = eval_points(total, cfg.evals)
    gossip = ShmGossip(cfg.workers, numel, tracked=cfg.adaptive_state == "tracked")
    gossip.x.copy_(x0)  # every worker starts from the same model
    gossip.share_optimizer_state(cfg.optim.build().init(torch.zeros(numel)))
    resumes, done_before = 0, 0.0
    if ckpt is not None:  # continue where the checkpoint left off
        resumes, done_before = int(ckpt["resumes"]) + 1, float(ckpt["wall_time"])
        gossip.x.copy_(ckpt["x"])
        if gossip.u is not None:
            gossip.u.copy_(ckpt["u"])
        for k, v in gossip.opt_state.items():
            v.copy_(ckpt["opt_state"][k])
        gossip.counters[0] = gossip.counters[1] = int(ckpt["completed"])
        gossip.counters[2] = int(ckpt["averages"])
        gossip.done_by.copy_(ckpt["done_by"])
        points = [p for p in points if p > int(ckpt["completed"])]
    # the audit starts from the models the workers start from (the checkpoint's, if any)
    audit_base = AuditBase.of(gossip.x, gossip.u, gossip.opt_state.get("vhat")) \
        if cfg.audit else None
    wcfg = cfg.replace(seed=cfg.seed + 1_000_003 * resumes) if resumes else cfg
    last_ckpt = time.monotonic()

    def save_checkpoint_now() -> None:
        from .checkpoint import save_checkpoint

        # models, optimizer states and counters all from one instant (under every lock)
        c = gossip.consistent_copy(LOCK_TIMEOUT_S, with_opt_state=True)
        save_checkpoint(cfg.checkpoint, {
            "config": cfg.to_dict(), "mode": "decentralized", "x": c.x, "u": c.u,
            "opt_state": c.opt_state, "completed": c.completed, "averages": c.averages,
            "done_by": c.done_by, "wall_time": time.monotonic() - t0, "resumes": resumes,
        })

    evals: list[EvalRecord] = []
    stats: dict[int, dict[str, Any]] = {}
    hello: set[int] = set()
    t0 = 0.0
    last_loss = torch.zeros(cfg.workers, 2, dtype=torch.float64)

    dead: set[int] = set()

    def evaluate(final: bool = False) -> torch.Tensor:
        """Score the models now; returns the average model x_bar."""
        nonlocal last_loss
        wall = (max(s["finished_at"] for s in stats.values()) if final else time.monotonic()) - t0
        c = gossip.consistent_copy(LOCK_TIMEOUT_S)
        xs, done = c.x, c.completed
        if dead:  # the average and the worst worker are over the living
            xs = xs[[i for i in range(cfg.workers) if i not in dead]]
        losses = gossip.losses.clone()
        d = losses - last_loss
        last_loss = losses
        train_loss = float(d[:, 0].sum() / d[:, 1].sum()) if d[:, 1].sum() > 0 else None
        rec, xbar = gossip_eval_record(cfg, evaluator, xs, wall, done, train_loss, c.averages)
        evals.append(rec)
        cb(Event("eval", rec.samples, total_samples, rec))
        return xbar

    stop_requested = _SignalStop()
    with ProcessGroup(tolerate=lambda name: name.startswith("worker ")) as group, \
            stop_requested:
        for i in range(cfg.workers):
            nb, p = nbp[i]
            group.start(f"worker {i}", adpsgd.worker_main,
                        (gossip.end(i, LOCK_TIMEOUT_S), wcfg, dataset, shards[i], devices[i],
                         nb, p, total), threads=tpw)
        cb(Event("start", 0, total_samples))
        deadline = time.monotonic() + cfg.timeout_s
        next_point = iter(points)
        point = next(next_point, None)
        last_progress = 0.0
        while len(stats) + len(dead - set(stats)) < cfg.workers:
            if time.monotonic() > deadline:
                raise RunTimeout(f"run exceeded timeout_s={cfg.timeout_s:g} s; still running: "
                                 f"{', '.join(group.alive()) or 'none'}")
            for name, msg in group.poll(0.02):
                if msg[0] == "hello":
                    hello.add(msg[1])
                    if len(hello) == cfg.workers:
                        t0 = time.monotonic() - done_before
                        gossip.go.set()
                elif msg[0] == "stats":
                    stats[msg[1]["worker"]] = msg[1]
                elif msg[0] == "died":  # neighbours stop choosing it; its locks are freed
                    w = int(name.split()[1])
                    dead.add(w)
                    gossip.recover(w)
                    cb(Event("died", 0, total_samples, None, f"{name} died ({msg[1]})"))
                    if len(dead) == cfg.workers:
                        raise ChildFailed("workers", "all workers died")
                else:
                    raise AssertionError(f"unexpected message from {name}: {msg!r}")
            if not gossip.go.is_set():
                continue
            if stop_requested.flag and not stop_requested.sent:
                gossip.stop[0] = 1  # workers finish their current update and exit
                stop_requested.sent = True
            if cfg.checkpoint is not None and not stop_requested.sent \
                    and time.monotonic() - last_ckpt > cfg.checkpoint_every_s:
                save_checkpoint_now()
                last_ckpt = time.monotonic()
            done = int(gossip.counters[1])
            if point is not None and point <= done < total:  # done == total: final eval
                evaluate()
                while point is not None and point <= done:
                    point = next(next_point, None)
            elif time.monotonic() - last_progress > 0.25:
                cb(Event("progress", done * cfg.data.batch_size, total_samples))
                last_progress = time.monotonic()
        if stop_requested.sent:  # every worker has stopped: the copy is consistent
            if cfg.checkpoint is not None:
                save_checkpoint_now()
            group.join(10.0)
            raise RunInterrupted(cfg.checkpoint, int(gossip.counters[1]))
        final_params = evaluate(final=True)
        if not group.join(30.0):
            raise ChildFailed(", ".join(group.alive()), "did not exit after the run finished")

    wall = max(s["finished_at"] for s in stats.values()) - t0
    if audit_base is not None and not dead:  # a death mid-average breaks it by design
        evals[-1].extra.update(audit_errors(audit_base, gossip.x, gossip.u, stats))
    for w in dead:
        n_done = int(gossip.done_by[w])
        stats[w] = {"updates": n_done, "samples": n_done * cfg.data.batch_size,
                    "compute_s": 0.0, "sleep_s": 0.0, "staleness": {}}
    result = decentralized_result(cfg, stats, wall, devices, evals, final_params, numel,
                                  "shm")
    result.failed_workers = sorted(dead)
    return result


def _run_sync(cfg: RunConfig, dataset: Dataset, cb: Callback) -> RunResult:
    """The synchronous baselines (allreduce, dpsgd) over shared memory: N worker processes.

    The budget is the same number of gradients as the asynchronous modes, in rounds of one
    gradient per worker: rounds = ceil(total updates / workers).
    """
    from .topology import make_topology, metropolis_hastings_weights, validate_topology

    sh = _Shared.prepare(cfg, dataset)
    n = cfg.workers
    rounds = max(1, -(-sh.total // n))
    total_samples = rounds * n * cfg.data.batch_size
    eval_at = eval_points(rounds, cfg.evals)
    snaps = torch.zeros(len(eval_at) + 1, sh.numel).share_memory_()
    weights: dict[int, list] = {}
    neighbors: dict[int, list[int]] = {i: [] for i in range(n)}
    if cfg.mode == "dpsgd":
        graph = validate_topology(make_topology(cfg.topology, n, seed=cfg.seed), n)
        weights = metropolis_hastings_weights(graph)
        neighbors = {i: [j for j, _ in weights[i] if j != i] for i in range(n)}
    state = ShmSync(n, sh.numel)
    evals: list[EvalRecord] = []
    stats: dict[int, dict[str, Any]] = {}
    final_params = None
    with ProcessGroup() as group:
        for i in range(n):
            group.start(f"worker {i}", sync.sync_worker_main,
                        (state.end(i, cfg.timeout_s), cfg, dataset, sh.shards[i], sh.devices[i],
                         sh.x0, rounds, eval_at, snaps, weights.get(i), neighbors[i]),
                        threads=sh.threads)
        cb(Event("start", 0, total_samples))
        deadline = time.monotonic() + cfg.timeout_s
        while len(stats) < n:
            if time.monotonic() > deadline:
                raise RunTimeout(f"run exceeded timeout_s={cfg.timeout_s:g} s; still running: "
                                 f"{', '.join(group.alive()) or 'none'}")
            for name, msg in group.poll(0.5):
                if msg[0] == "snap":
                    _, j, wall, samples, k, train_loss, final, extra = msg
                    loss, acc = sh.evaluator(snaps[j])
                    rec = EvalRecord(wall, samples, k, train_loss, loss, acc, extra=extra)
                    if final:
                        final_params = snaps[j].clone()
                    evals.append(rec)
                    cb(Event("eval", samples, total_samples, rec))
                elif msg[0] == "progress":
                    cb(Event("progress", msg[1], total_samples))
                elif msg[0] == "stats":
                    stats[msg[1]["worker"]] = msg[1]
                else:
                    raise AssertionError(f"unexpected message from {name}: {msg!r}")
        if not group.join(30.0):
            raise ChildFailed(", ".join(group.alive()), "did not exit after the run finished")
    wall = max(st["wall_time"] for st in stats.values())
    workers = [
        WorkerStats(worker=i, device=sh.devices[i], slowdown=cfg.slowdown_of(i),
                    updates=stats[i]["updates"], samples=stats[i]["samples"],
                    samples_per_s=stats[i]["samples"] / wall if wall else 0.0,
                    compute_s=stats[i]["compute_s"], sleep_s=stats[i]["sleep_s"])
        for i in range(n)
    ]
    return RunResult(
        config=cfg.to_dict(), mode=cfg.mode, transport="shm", n_params=sh.numel,
        wall_time=wall, updates=rounds, samples=sum(w.samples for w in workers), evals=evals,
        staleness={0: rounds}, workers=workers, final_params=final_params,
    )
