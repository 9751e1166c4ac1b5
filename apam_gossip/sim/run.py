"""Every mode on the virtual clock (see :mod:`apam_gossip.sim`).

The algorithms are the real ones, step for step: the rules are the cores of
:mod:`apam_gossip.core` that every runtime drives, and the simulator drives them on a
virtual clock:

* **centralized** (APAM): the master is a FIFO server; a worker's gradient is computed on
  the model it last received (its version fixes the staleness), travels to the master,
  queues, is applied (the optimizer of :mod:`apam_gossip.optim`, the lr of the global
  update count, BatchNorm buffers adopted) and the new model travels back;
* **decentralized** (gossip): each update claims its place in the shared budget, computes
  its gradient on a snapshot of the worker's model, averages with a random neighbor
  (the real picker and seeds) when the exchange there and back has completed, then takes
  the local step (:class:`~apam_gossip.core.gossip.GossipRule`). With
  ``overlap`` the exchange starts with the gradient and the step waits for both; with
  ``overlap = false``, it starts after the gradient. The simulator assumes overlap unless
  it is turned off (real runs measure both ways per worker and keep the faster). The
  simulated average is always exact and never refused: an idealized protocol;
* **allreduce** and **dpsgd**: rounds lasting the slowest worker's gradient plus the
  collective (:class:`~apam_gossip.sim.cluster.Cluster`);
* **syncps** (the APAM paper's synchronous parameter server): steps in lockstep; the
  master's model travels to every worker (queued at the master's NIC), each worker
  computes a gradient on its share ``b_i`` of the global batch
  (:func:`~apam_gossip.core.sync.split_batch`; its time is the model's gradient at ``b_i``
  samples, see :func:`share_times`), sends it back, and the master, once all have
  arrived, takes the sample-weighted mean and one step
  (:func:`~apam_gossip.core.sync.syncps_step`; ``master_update_s`` x (1 + ``MEAN_PASS``
  x workers) of work);
* **sequential**: one worker.

Math mode computes each gradient with the real model on the real batches of that worker's
seeded stream (:class:`Oracle`), so a 1-worker simulation is the sequential run exactly and
a simulated all-reduce is the real one's arithmetic. Timing-only mode keeps the clock and
the counters, no math.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..algorithms.adpsgd import neighbor_picker
from ..algorithms.common import Diverged, batch_size_of, worker_seed
from ..average import average_pair_, mix_into
from ..config import ConfigError, NetworkConfig, RunConfig
from ..core.apam import ApamCore, shards_of
from ..core.compress import (
    Compressor,
    encode_change,
    exchange_pair,
    gamma_for,
    mix,
    packet,
    parse_compress,
    wire_bytes,
)
from ..core.consensus import consensus
from ..core.gossip import GossipRule
from ..core.sync import allreduce_step, split_batch, syncps_step
from ..data import check_augment, load_data
from ..emulation import MASTER
from ..evaluate import Evaluator, rescore_final
from ..flat import flatten
from ..optim import Optimizer
from ..plan import RunPlan, topology_of
from ..reporting import with_task
from ..result import EvalRecord, RunResult, WorkerStats
from ..task import Task, compute_loss, make_task
from ..topology import metropolis_hastings_weights, neighbor_probabilities
from .cluster import Cluster, calibrate, per_worker
from .engine import Engine, Resource
from .hardware import Hardware

SIM_MODES = ("sequential", "centralized", "decentralized", "allreduce", "dpsgd", "syncps")
# the default spread of gradient times: real ones vary by about this much run to run on
# an idle core (BENCHMARKS.md, "The simulator")
GRADIENT_CV = 0.1
# syncps's weighted mean: one accumulating pass over the model per worker, in units of one
# AMSGrad step of that model (measured on this machine kind, one thread: 0.054 at 44k
# parameters, 0.041 at 1M, 0.077 at 25M; BENCHMARKS.md, issue 23)
MEAN_PASS = 0.06


class Oracle:
    """The real gradient of worker ``i`` at a given model state: one model for all
    workers (its state loaded first), each worker's own seeded batch stream over its
    shard, exactly as :class:`~apam_gossip.algorithms.common.LocalWorker` draws them."""

    def __init__(self, cfg: RunConfig, task: Task, data: Any, shards: list[Tensor],
                 batch_sizes: Sequence[int] | None = None) -> None:
        model = task.build_model()
        model.train()
        self.flat = flatten(model, "cpu", who=f"model {task.model_name}")
        self.task = task
        # the dropout/augmentation randomness of a 1-worker run is the sequential run's
        torch.manual_seed(worker_seed(cfg.seed, 0))
        sizes = batch_sizes or [cfg.data.batch_size] * len(shards)
        self.streams = [data.stream(s, sizes[i], worker_seed(cfg.seed, i),
                                    torch.device("cpu"), cfg.data.augment)
                        for i, s in enumerate(shards)]

    def gradient(self, i: int, x: Tensor) -> tuple[float, int, Tensor]:
        """(loss, samples, ``[grads | buffers after the forward pass]``, a copy)."""
        flat = self.flat
        flat.state.copy_(x)
        bx, by = self.streams[i].next()
        flat.zero_grad()
        loss = compute_loss(self.task, flat.model, bx, by, f"worker {i}")
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value) or not math.isfinite(float(flat.grads.sum())):
            raise Diverged(f"worker {i}: the loss is {value} (simulated); try a smaller "
                           "learning rate")
        return value, batch_size_of(by), flat.pack_grad_msg().clone()


@dataclass
class _Sim:
    """One simulation's shared parts."""

    cfg: RunConfig
    plan: RunPlan
    cluster: Cluster
    oracle: Oracle | None  # None: timing only
    evaluator: Evaluator | None
    task: Task
    initial_models: Tensor | None = None
    # CPU seconds of one evaluation during the run, computed on the coordinator's node
    # (0: not modeled; see simulate's ``hardware``)
    eval_s: float = 0.0
    compress: Compressor | None = None  # decentralized: compressed exchanges
    compress_s: float = 0.0  # ... one side's CPU seconds of one
    numel: int = 0  # the timed model's entries (model_params, or the task model's)

    @property
    def math(self) -> bool:
        return self.oracle is not None

    def eval_load(self, eng: Engine) -> None:
        """An evaluation during the run: the coordinator's work on the master's node."""
        if self.eval_s > 0:
            self.cluster.node_work(eng, self.eval_s)

    def evaluate(self, x: Tensor | None, wall: float, samples: int, updates: int,
                 losses: list[float], extra: dict[str, float] | None = None) -> EvalRecord:
        train_loss = sum(losses) / len(losses) if losses else None
        losses.clear()
        if self.evaluator is None or x is None:
            return EvalRecord(wall, samples, updates, train_loss, float("nan"), float("nan"),
                              extra or {})
        loss, metric = self.evaluator(x)
        return EvalRecord(wall, samples, updates, train_loss, loss, metric, extra or {})


def simulate(config: RunConfig, *, model: Any = None, train_data: Any = None,
             test_data: Any = None, loss: Any = None, metric: Any = None,
             dataset: Any = None, timing_only: bool = False,
             gradient_s: float | Sequence[float] | None = None,
             master_update_s: float | None = None,
             worker_update_s: float | None = None,
             initial_models: Tensor | None = None,
             model_params: int | None = None,
             gradient_cv: float = GRADIENT_CV,
             hardware: Hardware | None = None,
             compress_s: float | None = None) -> RunResult:
    """Simulate ``config`` (any number of workers) and return its RunResult, whose
    ``simulation`` says how (``wall_time`` is virtual seconds). The model, data, loss and
    metric are given as to :func:`apam_gossip.run`. ``gradient_s`` (one number, or one per
    worker repeating cyclically), ``master_update_s``,
    ``worker_update_s``: the cluster's costs; by default the real model is timed on this
    machine (:func:`~apam_gossip.sim.cluster.calibrate`). ``initial_models``
    (decentralized, math): one starting state per worker (``workers x numel``) instead of
    the common seeded one, e.g. to watch gossip alone reach consensus. ``model_params``:
    time the transfers and the optimizer steps as for a model of that many parameters
    (the timed update costs scale by its size over the task model's; give ``gradient_s``:
    the gradient of such a model is not timed); math mode still trains the task's model,
    so its accuracy curve is the task model's under that cluster's timing.
    ``gradient_cv``: the spread of one worker's gradient times (coefficient of variation
    of a lognormal factor with mean 1; 0 = every gradient exactly ``gradient_s``).
    ``compress_s`` (decentralized with ``compress``): one side's CPU seconds of a
    compressed exchange (encode, decode, mix); by default timed here on a vector of the
    model's size (:func:`compress_seconds`); each exchange costs it at both ends, and its
    transfers carry packets, not models.
    ``hardware``: nodes, CPU contention, shared NICs and congestion, all-reduce overlapped
    with the backward pass (:class:`~apam_gossip.sim.hardware.Hardware`; default: none of
    it); its ``contention = "measure"`` times the model co-running on this machine's cores
    (:func:`~apam_gossip.sim.contention.measure_contention`) first."""
    cfg = config
    if cfg.mode not in SIM_MODES:
        raise ConfigError(f"mode {cfg.mode!r} cannot be simulated; use one of "
                          f"{', '.join(SIM_MODES)}")
    data = dataset if dataset is not None else load_data(cfg, train_data, test_data)
    data = data.subset(cfg.data.train_limit, cfg.data.test_limit)
    check_augment(data, cfg.data.augment)
    if cfg.mode == "sequential":  # worker 0 alone, as the real sequential run
        cfg = cfg.replace(workers=1, slowdown=list(cfg.slowdown[:1]),
                          network=NetworkConfig().model_dump())  # no transfers to time
    if not timing_only and cfg.workers > data.train_size():
        raise ConfigError(f"workers ({cfg.workers}) exceeds the {data.train_size()} training "
                          "samples (a math-mode simulation gives each worker its shard; "
                          "--timing-only has no such limit)")
    task = make_task(cfg, data, model=model, loss=loss, metric=metric)
    threads = torch.get_num_threads()
    t_real = time.perf_counter()
    try:
        if gradient_s is not None:
            gs = [gradient_s] if isinstance(gradient_s, (int, float)) else list(gradient_s)
            if not gs or not all(isinstance(g, (int, float)) and 0 < g <= 1e4 for g in gs):
                raise ConfigError(f"gradient_s must be seconds > 0, one or one per worker; "
                                  f"got {gradient_s!r}")
        if not 0 <= gradient_cv <= 10:
            raise ConfigError(f"gradient_cv must be in [0, 10], got {gradient_cv!r}")
        if model_params is not None and (gradient_s is None or model_params < 1):
            raise ConfigError("model_params needs gradient_s (that model's gradient cannot "
                              "be timed here) and must be >= 1")
        plan = _plan(cfg, data, task, timing_only)
        given = gradient_s
        if worker_update_s is None or master_update_s is None or gradient_s is None:
            g_s, u_s = calibrate(task, data, cfg)
            if model_params is not None:  # an optimizer step is linear in the model size
                u_s *= model_params / plan.n_params
            gradient_s = g_s if gradient_s is None else gradient_s
            worker_update_s = u_s if worker_update_s is None else worker_update_s
            master_update_s = u_s if master_update_s is None else master_update_s
        if cfg.mode == "syncps":  # each worker's gradient is of its share of the batch
            gradient_s = share_times(task, data, cfg, given)
        hw = hardware or Hardware()
        measured = None
        if hw.contention == "measure":
            from .contention import measured_hardware

            hw, measured = measured_hardware(hw, cfg, task, data)
        torch.set_num_threads(1)  # the math of one simulated worker at a time
        numel = plan.numel if model_params is None else int(model_params)
        cluster = Cluster.of(cfg, numel, gradient_s, master_update_s, worker_update_s,
                             gradient_cv, hw)
        oracle = evaluator = None
        if not timing_only:
            oracle = Oracle(cfg, task, data, plan.shards,
                            split_batch(cfg.data.batch_size, cfg.workers)
                            if cfg.mode == "syncps" else None)
            evaluator = Evaluator(task, data, torch.device("cpu"), during=cfg.eval_samples)
        comp = parse_compress(cfg.compress) if cfg.mode == "decentralized" else None
        if comp is not None and compress_s is None:
            compress_s = compress_seconds(comp, numel)
        sim = _Sim(cfg, plan, cluster, oracle, evaluator, task, initial_models,
                   _eval_s(cfg, task, data, plan, hw, model_params, evaluator),
                   comp, compress_s or 0.0, numel)
        runner = {"sequential": _sequential, "centralized": _centralized,
                  "decentralized": _decentralized, "allreduce": _sync, "dpsgd": _sync,
                  "syncps": _syncps}
        result, events = runner[cfg.mode](sim)
    finally:
        torch.set_num_threads(threads)
    if not timing_only:
        rescore_final(result, task, data, "cpu", cfg.eval_samples)
    result.simulation = {"timing_only": timing_only, "gradient_s": gradient_s,
                         "master_update_s": master_update_s,
                         "worker_update_s": worker_update_s,
                         "gradient_cv": gradient_cv, "events": events,
                         **({"compress_s": compress_s} if comp is not None else {}),
                         "hardware": hw.describe(),
                         **({"contention_measured": measured} if measured else {}),
                         "real_seconds": time.perf_counter() - t_real}
    return with_task(result, task)


def compress_seconds(comp: Compressor, numel: int) -> float:
    """One side's CPU seconds of a compressed exchange of a ``numel``-entry model on this
    machine, one thread: encode the change, decode both packets, mix (timed on up to 4M
    entries, best of 3, scaled linearly beyond)."""
    m = min(numel, 1 << 22)
    g = torch.Generator().manual_seed(0)
    x, mine, theirs = (torch.randn(m, generator=g) for _ in range(3))
    q = packet(comp, m)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        encode_change(comp, x, mine, q)
        mix(comp, x, mine, theirs, q, q, 0.5)
        best = min(best, time.perf_counter() - t)
    return best * numel / m


def share_times(task: Task, data: Any, cfg: RunConfig,
                gradient_s: float | Sequence[float] | None) -> list[float]:
    """syncps: each worker's gradient time on its share ``b_i`` of the global batch ``B``.
    A gradient's time is far from proportional to its batch (LeNet5 on one core: 1.07 ms
    at 1 sample, 1.48 ms at 4, 9.95 ms at 40), so the model is timed here at each share
    (:func:`~apam_gossip.sim.cluster.calibrate`). Given ``gradient_s`` (the time of a
    gradient of ``B`` samples), each worker's is scaled by the timed ratio
    ``t(b_i) / t(B)``; with ``model_params`` that is the task model's ratio."""
    shares = split_batch(cfg.data.batch_size, cfg.workers)
    timed = {b: calibrate(task, data, cfg.replace(data={"batch_size": b}))[0]
             for b in sorted(set(shares) | ({cfg.data.batch_size} if gradient_s is not None
                                           else set()))}
    if gradient_s is None:
        return [timed[b] for b in shares]
    base = per_worker(gradient_s, cfg.workers)
    return [base[i] * timed[b] / timed[cfg.data.batch_size] for i, b in enumerate(shares)]


def _eval_s(cfg: RunConfig, task: Task, data: Any, plan: RunPlan, hw: Hardware,
            model_params: int | None, evaluator: Evaluator | None) -> float:
    """One evaluation during the run timed alone (one thread), when the coordinator
    shares the master's node with the workers (``master_shares_node`` and a contention
    curve), as on one machine; else 0. Not for ``model_params`` (the task model's
    evaluation says nothing about that model's)."""
    if not (hw.contended and hw.master_shares_node) or model_params is not None \
            or cfg.evals < 1:
        return 0.0
    # math mode's own evaluator, else one like it (timing only: none was built)
    ev = evaluator or Evaluator(task, data, torch.device("cpu"), during=cfg.eval_samples)
    ev(plan.x0)  # warm-up
    t = time.perf_counter()
    ev(plan.x0)
    return time.perf_counter() - t


def _plan(cfg: RunConfig, data: Any, task: Task, timing_only: bool) -> RunPlan:
    if not timing_only:
        return RunPlan.of(cfg, data, task)
    # no shards (10,000 workers need no data split): the budget and the model size
    from ..plan import total_updates

    x0, n_params = task.initial_state()
    return RunPlan(cfg, x0, n_params, [], total_updates(cfg, data.train_size()))


def _workers(cfg: RunConfig, updates: list[int], samples: list[int], compute: list[float],
             wall: float) -> list[WorkerStats]:
    out = [WorkerStats.of(i, "simulated", cfg.slowdown_of(i), updates[i], samples[i], wall,
                          compute[i]) for i in range(cfg.workers)]
    if cfg.mode == "decentralized":  # what the simulated gossip assumed (see above)
        for w in out:
            w.overlap = cfg.overlap is not False
    return out


def _result(sim: _Sim, wall: float, updates: int, samples: int, evals: list[EvalRecord],
            staleness: dict[int, int], workers: list[WorkerStats],
            final: Tensor | None) -> RunResult:
    return RunResult.of(sim.cfg.to_dict(), sim.cfg.mode, "simulated", sim.plan.n_params, wall,
                        updates, evals, staleness, workers, final, samples=samples)


# ----------------------------------------------------------------------------- modes
def _sequential(sim: _Sim) -> tuple[RunResult, int]:
    cfg, plan, cl = sim.cfg, sim.plan, sim.cluster
    opt = Optimizer(cfg.optim)
    x = plan.x0.clone()
    n = plan.n_params
    state = opt.init(x[:n]) if sim.math else None
    points = set(plan.eval_at)
    t, samples, losses, evals = 0.0, 0, [], []
    compute = 0.0
    evals.append(sim.evaluate(x if sim.math else None, 0.0, 0, 0, losses))
    for k in range(1, plan.total + 1):
        c = cl.compute_s(0)
        compute += c
        t += c + cl.worker_update_s
        if sim.math:
            loss, b, msg = sim.oracle.gradient(0, x)
            opt.update(x[:n], msg[:n], state, lr=opt.lr_at(k, plan.total))
            x[n:] = msg[n:]
            losses.append(loss)
        else:
            b = cfg.data.batch_size
        samples += b
        if k in points:
            evals.append(sim.evaluate(x if sim.math else None, t, samples, k, losses))
    workers = _workers(cfg, [plan.total], [samples], [compute], t)
    return _result(sim, t, plan.total, samples, evals, {0: plan.total}, workers,
                   x if sim.math else None), plan.total


def _centralized(sim: _Sim) -> tuple[RunResult, int]:
    if sim.cfg.master_shards > 1:
        return _centralized_sharded(sim)
    cfg, plan, cl = sim.cfg, sim.plan, sim.cluster
    eng, master = Engine(), Resource()
    total, nw = plan.total, cfg.workers
    # the real master's rule (timing only: its progress alone)
    core = ApamCore(plan.x0 if sim.math else None, cfg.optim, nw, n_params=plan.n_params,
                    total=total)
    compute = [0.0] * nw
    points = iter(p for p in plan.eval_at if p > 0)
    next_eval = next(points, None)
    losses: list[float] = []
    evals = [sim.evaluate(core.x, 0.0, 0, 0, losses)]
    sim.eval_load(eng)  # the snapshot at 0, evaluated beside the first steps
    end = [0.0]

    def give(i: int) -> None:  # the master sends its model to worker i
        arrive = cl.transfer(eng.now, MASTER, i)
        snap = core.model_for_workers().clone() if sim.math else None
        v = core.version
        eng.at(arrive, lambda: start(i, v, snap))

    def start(i: int, v: int, snap: Tensor | None) -> None:
        # the gradient depends only on the model it starts from and the worker's stream
        grad = sim.oracle.gradient(i, snap) if sim.math else None

        def computed(c: float) -> None:
            compute[i] += c
            eng.at(cl.transfer(eng.now, i, MASTER), lambda: queue(i, v, grad))
        cl.gradient(eng, i, computed)

    def queue(i: int, v: int, grad) -> None:
        cl.master_update(eng, master, lambda: apply(i, v, grad))

    def apply(i: int, v: int, grad) -> None:
        nonlocal next_eval
        if core.version >= total:
            return  # the budget is spent: dropped, as the real master drops it
        msg, b = None, cfg.data.batch_size
        if grad is not None:
            loss, b, msg = grad
            losses.append(loss)
        core.apply(i, msg, v, b)
        version = core.version
        if version == next_eval:
            evals.append(sim.evaluate(core.x, eng.now, core.progress.samples, version,
                                      losses))
            sim.eval_load(eng)
            next_eval = next(points, None)
        if version >= total:
            end[0] = eng.now
            eng.stop()
            return
        give(i)

    for i in range(nw):
        give(i)
    eng.run()
    wall = end[0]
    p = core.progress
    workers = _workers(cfg, p.updates_of, p.samples_of, compute, wall)
    result = _result(sim, wall, p.version, p.samples, evals, dict(p.staleness), workers,
                     core.x)
    if evals and wall > 0:
        evals[-1].extra["master_busy"] = master.busy_until(wall) / wall
        evals[-1].extra["master_nic_busy"] = max(
            cl.nic(MASTER, d).busy_until(wall) for d in ("in", "out")) / wall
    return result, eng.events


def _centralized_sharded(sim: _Sim) -> tuple[RunResult, int]:
    """APAM with ``master_shards = K > 1``: each shard a FIFO server over its slice with
    its own NIC (links like the master's), its step ``master_update_s`` x its share of
    the model; shard 0 asks for exactly the budget (a worker it asks nothing more of
    waits); a worker starts once every shard's slice has arrived and sends each shard its
    slice of the gradient (see :mod:`apam_gossip.algorithms.shards`)."""
    cfg, plan, cl = sim.cfg, sim.plan, sim.cluster
    eng, nw, total = Engine(), cfg.workers, plan.total
    shards = shards_of(plan.numel, plan.n_params, cfg.master_shards)
    k_all = len(shards)
    masters = [Resource() for _ in shards]
    ids = [MASTER - k for k in range(k_all)]  # shard k's node and NIC
    # each shard's share of the model's bytes (timing-only runs may give model_params)
    nbytes = [round(cl.nbytes * s.numel / plan.numel) for s in shards]
    step_s = [cl.master_update_s * s.numel / plan.numel for s in shards]
    cores = [ApamCore(s.of(plan.x0) if sim.math else None, cfg.optim, nw,
                      n_params=s.n_params, total=total) for s in shards]
    compute = [0.0] * nw
    got: list[dict[int, tuple[int, Tensor | None]]] = [{} for _ in range(nw)]
    asked, end = [0], [0.0]
    points = [p for p in plan.eval_at if p > 0]
    pending: dict[int, dict[int, Tensor | None]] = {}  # point -> shard -> its slice there
    losses: list[float] = []

    def whole() -> Tensor | None:
        return torch.cat([c.x for c in cores]) if sim.math else None

    evals = [sim.evaluate(whole(), 0.0, 0, 0, losses)]
    sim.eval_load(eng)

    def reply(k: int, i: int) -> None:
        """Shard k sends worker i its slice (the leader only while it has gradients to
        ask for)."""
        if k == 0:
            if asked[0] >= total:
                return
            asked[0] += 1
        snap = cores[k].model_for_workers().clone() if sim.math else None
        v = cores[k].version
        eng.at(cl.transfer(eng.now, ids[k], i, nbytes[k]), lambda: arrived(i, k, v, snap))

    def arrived(i: int, k: int, v: int, snap: Tensor | None) -> None:
        got[i][k] = (v, snap)
        if len(got[i]) == k_all:
            parts, got[i] = got[i], {}
            start(i, [parts[j][0] for j in range(k_all)],
                  torch.cat([parts[j][1] for j in range(k_all)]) if sim.math else None)

    def start(i: int, versions: list[int], x: Tensor | None) -> None:
        grad = sim.oracle.gradient(i, x) if sim.math else None

        def computed(c: float) -> None:
            compute[i] += c
            for k in range(k_all):
                eng.at(cl.transfer(eng.now, i, ids[k], nbytes[k]),
                       lambda k=k: cl.master_update(
                           eng, masters[k], lambda: apply(k, i, versions[k], grad),
                           work=step_s[k], shard=k))
        cl.gradient(eng, i, computed)

    def apply(k: int, i: int, v: int, grad) -> None:
        msg, b = None, cfg.data.batch_size
        if grad is not None:
            loss, b, full = grad
            msg = shards[k].of(full)
            if k == 0:
                losses.append(loss)
        cores[k].apply(i, msg, v, b)
        version = cores[k].version
        if version in points:  # scored once every shard is there
            slot = pending.setdefault(version, {})
            slot[k] = cores[k].x.clone() if sim.math else None
            if len(slot) == k_all:
                del pending[version]
                x = torch.cat([slot[j] for j in range(k_all)]) if sim.math else None
                p0 = cores[0].progress
                evals.append(sim.evaluate(x, eng.now, p0.samples if k == 0 else
                                          version * cfg.data.batch_size, version, losses))
                sim.eval_load(eng)
        if all(c.version >= total for c in cores):
            end[0] = eng.now
            eng.stop()
            return
        reply(k, i)

    for i in range(nw):
        for k in range(k_all):
            reply(k, i)
    eng.run()
    wall = end[0]
    p = cores[0].progress
    workers = _workers(cfg, p.updates_of, p.samples_of, compute, wall)
    result = _result(sim, wall, p.version, p.samples, evals, dict(p.staleness), workers,
                     whole())
    if evals and wall > 0:
        extra = evals[-1].extra
        extra["master_busy"] = max(m.busy_until(wall) for m in masters) / wall
        extra["master_nic_busy"] = max(cl.nic(j, d).busy_until(wall) for j in ids
                                       for d in ("in", "out")) / wall
        for k, c in enumerate(cores):
            n = sum(c.progress.staleness.values())
            extra[f"staleness_mean_shard{k}"] = sum(
                a * m for a, m in c.progress.staleness.items()) / n if n else 0.0
    return result, eng.events


def _decentralized(sim: _Sim) -> tuple[RunResult, int]:
    cfg, plan, cl = sim.cfg, sim.plan, sim.cluster
    eng = Engine()
    n, total, nw = plan.n_params, plan.total, cfg.workers
    tracked = cfg.adaptive_state == "tracked"
    rule = GossipRule(cfg.optim, nw, n, tracked)
    starts = sim.initial_models
    if starts is not None and tuple(starts.shape) != (nw, plan.numel):
        raise ConfigError(f"initial_models must be workers x numel = ({nw}, {plan.numel}), "
                          f"got {tuple(starts.shape)}")
    xs = [(plan.x0 if starts is None else starts[i]).clone() for i in range(nw)] \
        if sim.math else None
    us = [torch.zeros(n) for _ in range(nw)] if sim.math and tracked else None
    states = [rule.init_state() for _ in range(nw)] if sim.math else None
    graph = topology_of(cfg)
    probs = neighbor_probabilities(graph)
    picks = [neighbor_picker(*probs[i], worker_seed(cfg.seed, i) + 1,
                             choice=cfg.neighbour_choice) if probs[i][0] else None
             for i in range(nw)]
    comp = sim.compress
    gamma = gamma_for(comp, cfg.compress_gamma)
    # compressed: each edge's public copies (one pair: the simulator holds both ends),
    # from the start every worker knows; the packets' bytes on the wire
    public = {e: xs[e[0]].clone() for a, b in graph.edges() for e in ((a, b), (b, a))} \
        if comp is not None and xs is not None else None
    wire = comp.nbytes(sim.numel) if comp is not None else None
    versions = [0] * nw
    claimed = completed = averages = 0
    staleness: Counter[int] = Counter()
    updates, samples, compute = [0] * nw, [0] * nw, [0.0] * nw
    points = iter(p for p in plan.eval_at if 0 < p < total)
    next_eval = next(points, None)
    losses: list[float] = []
    running = [nw]
    end = [0.0]

    def mean_and_consensus() -> tuple[Tensor | None, dict[str, float]]:
        return consensus(torch.stack(xs), n) if sim.math else (None, {})

    xbar0, extra0 = mean_and_consensus()
    evals = [sim.evaluate(xbar0, 0.0, 0, 0, losses, extra0)]
    sim.eval_load(eng)  # the snapshot at 0, evaluated beside the first steps

    def begin(i: int) -> None:
        nonlocal claimed
        if claimed >= total:
            running[0] -= 1
            if running[0] == 0:
                end[0] = eng.now
            return
        claimed += 1
        k = claimed
        v0 = versions[i]
        grad = None
        if sim.math:  # at the snapshot; the forward pass moves the buffers from its own
            buffers0 = xs[i][n:].clone()
            loss, b, msg = sim.oracle.gradient(i, xs[i])
            grad = (loss, b, msg, rule.buffer_delta(msg[n:], buffers0))
        if cfg.overlap is False:  # the gradient, then the exchange, then the local step
            def computed(c: float) -> None:
                compute[i] += c
                exchange(i, lambda j: step(i, j, k, v0, grad))
            cl.gradient(eng, i, computed)
            return
        # overlap: the exchange starts with the gradient; the step waits for both
        waits, partner = [2], [None]

        def one_done(j: int | None = None, from_exchange: bool = False) -> None:
            if from_exchange:
                partner[0] = j
            waits[0] -= 1
            if waits[0] == 0:
                step(i, partner[0], k, v0, grad)

        def gradient_done(c: float) -> None:
            compute[i] += c
            one_done()
        cl.gradient(eng, i, gradient_done)
        exchange(i, lambda j: one_done(j, True))

    def exchange(i: int, then) -> None:
        """The model to a random neighbor and the average back; the average is applied
        (atomically) when it arrives, then ``then(j)`` (j None: no neighbor)."""
        j = picks[i]() if picks[i] is not None else None
        if j is None:
            then(None)
            return

        t0 = eng.now

        def arrived() -> None:
            average(i, j)
            picks[i].observe(j, eng.now - t0)  # (--neighbour-choice fast learns from it)
            then(j)
        if comp is None:
            there = cl.transfer(eng.now, i, j)  # the model there, then the average back
            eng.at(there, lambda: eng.at(cl.transfer(eng.now, j, i), arrived))
            return
        # i encodes, its packet goes; j encodes and mixes, its packet comes back; i
        # mixes: each side's compression time (half of it encoding, half mixing) once.
        # A transfer is booked when it starts (the NICs serve in booking order).
        half = sim.compress_s / 2

        def back() -> None:
            eng.at(cl.transfer(eng.now, j, i, wire) + half, arrived)
        eng.after(half, lambda: eng.at(cl.transfer(eng.now, i, j, wire) + 2 * half, back))

    def average(i: int, j: int) -> None:
        nonlocal averages
        if sim.math and public is not None:  # the one exchange the transports make
            exchange_pair(comp, gamma, xs[i], xs[j], public[(i, j)], public[(j, i)])
        elif sim.math:  # the torch pair, as before numba (no compile in a simulation)
            average_pair_(xs[i], xs[j], fused=False)
            if us is not None:
                average_pair_(us[i], us[j], fused=False)
        versions[i] += 1
        versions[j] += 1
        averages += 1

    def step(i: int, j: int | None, k: int, v0: int, grad) -> None:
        """The local step (after the average with j, if any)."""
        nonlocal completed, next_eval
        b = cfg.data.batch_size
        if grad is not None:
            loss, b, msg, delta = grad
            rule.step(msg[:n], states[i], rule.lr_at(k, total), delta)(
                xs[i], us[i] if us is not None else None)
            losses.append(loss)
        versions[i] += 1
        staleness[rule.staleness(v0, versions[i], j is not None)] += 1
        updates[i] += 1
        samples[i] += b
        completed += 1
        if completed == next_eval:
            xbar, extra = mean_and_consensus()
            evals.append(sim.evaluate(xbar, eng.now, sum(samples), completed, losses, extra))
            sim.eval_load(eng)
            next_eval = next(points, None)
        eng.after(cl.worker_update_s, lambda: begin(i))

    for i in range(nw):
        eng.at(0.0, lambda i=i: begin(i))
    eng.run()
    wall = end[0]
    xbar, extra = mean_and_consensus()
    extra["averages"] = float(averages)
    extra["bytes_per_average"] = float(wire_bytes(cfg, sim.numel, n if sim.numel == plan.numel
                                                  else sim.numel))
    evals.append(sim.evaluate(xbar, wall, sum(samples), completed, losses, extra))
    workers = _workers(cfg, updates, samples, compute, wall)
    for w, p in zip(workers, picks, strict=True):
        if p is not None:
            w.neighbours = {str(j): int(c) for j, c in sorted(p.counts.items())}
    return _result(sim, wall, completed, sum(samples), evals, dict(staleness), workers,
                   xbar), eng.events


def _sync(sim: _Sim) -> tuple[RunResult, int]:
    """allreduce and dpsgd: rounds of one gradient per worker, then the collective."""
    cfg, plan, cl = sim.cfg, sim.plan, sim.cluster
    n, nw, rounds = plan.n_params, cfg.workers, plan.rounds
    opt = Optimizer(cfg.optim)
    dpsgd = cfg.mode == "dpsgd"
    if dpsgd:
        graph = topology_of(cfg)
        weights = metropolis_hastings_weights(graph)
        nbrs = [[j for j, _ in weights[i] if j != i] for i in range(nw)]
        comm = max(cl.exchange_s(i, nbrs[i]) for i in range(nw))
    else:
        comm = cl.allreduce_s()
    varying = cl.congestion is not None
    overlapped = cl.hardware.allreduce_overlap and not dpsgd
    x = plan.x0.clone()
    xs = [plan.x0.clone() for _ in range(nw)] if sim.math and dpsgd else None
    state = opt.init(x[:n]) if sim.math and not dpsgd else None
    states = [opt.init(torch.zeros(n)) for _ in range(nw)] if sim.math and dpsgd else None
    points = set(plan.eval_at)
    t, losses, samples = 0.0, [], [0] * nw
    compute = [0.0] * nw

    def model() -> tuple[Tensor | None, dict[str, float]]:
        if not sim.math:
            return None, {}
        return consensus(torch.stack(xs), n) if dpsgd else (x, {})

    m0, e0 = model()
    evals = [sim.evaluate(m0, 0.0, 0, 0, losses, e0)]
    # the coordinator's evaluation work not yet done (it evaluates beside the rounds, from
    # the snapshot at 0 and at every point on, for as many rounds as it takes)
    eval_left = sim.eval_s
    for k in range(1, rounds + 1):
        works = [cl.work_s(i) for i in range(nw)] if cl.hardware.contended else None
        cs = cl.round_s(works, [eval_left] if eval_left > 0 else []) if works \
            else [cl.compute_s(i) for i in range(nw)]
        if eval_left > 0:  # processor sharing: it progressed as much as the longest gradient
            eval_left = max(0.0, eval_left - max(w for w, _ in works))
        for i, c in enumerate(cs):
            compute[i] += c
        if varying:  # the network's state when this round's collective starts
            comm = max(cl.exchange_s(i, nbrs[i], t + max(cs)) for i in range(nw)) if dpsgd \
                else cl.allreduce_s(t + max(cs))
        t0 = t
        if overlapped:
            t += cl.overlapped_round_s(max(cs), comm) + cl.worker_update_s
        else:
            t += max(cs) + comm + cl.worker_update_s
        if eval_left > 0:  # alone on the node while the workers sleep and communicate
            eval_left = max(0.0, eval_left - (t - t0 - max(cs)) / cl.hardware.factor(1))
        lr = opt.lr_at(k, rounds)
        if sim.math and not dpsgd:
            msgs = []
            for i in range(nw):
                loss, b, msg = sim.oracle.gradient(i, x)
                msgs.append(msg)
                losses.append(loss)
                samples[i] += b
            mean = torch.stack(msgs).mean(0)
            allreduce_step(opt, x[:n], x[n:], mean, state, lr)
        elif sim.math:
            grads, after = [], []
            for i in range(nw):
                loss, b, msg = sim.oracle.gradient(i, xs[i])
                grads.append(msg[:n])
                after.append(torch.cat([xs[i][:n], msg[n:]]))  # buffers moved by forward
                losses.append(loss)
                samples[i] += b
            for i in range(nw):  # the transports' arithmetic of a mix
                xs[i] = mix_into(torch.empty_like(after[i]), weights[i], after.__getitem__)
                opt.update(xs[i][:n], grads[i], states[i], lr=lr)
        else:
            for i in range(nw):
                samples[i] += cfg.data.batch_size
        if k in points:
            m, e = model()
            evals.append(sim.evaluate(m, t, sum(samples), k, losses, e))
            eval_left += sim.eval_s if k < rounds else 0.0
    m, _ = model()
    workers = _workers(cfg, [rounds] * nw, samples, compute, t)
    return _result(sim, t, rounds, sum(samples), evals, {}, workers, m), rounds * nw


def _syncps(sim: _Sim) -> tuple[RunResult, int]:
    """syncps: lockstep steps over the star (see the module docstring)."""
    cfg, plan, cl = sim.cfg, sim.plan, sim.cluster
    eng, master = Engine(), Resource()
    total, nw, n = plan.total, cfg.workers, plan.n_params
    shares = split_batch(cfg.data.batch_size, nw)
    opt = Optimizer(cfg.optim)
    x = plan.x0.clone()
    state = opt.init(x[:n]) if sim.math else None
    scratch = torch.empty_like(x) if sim.math else None
    points = set(plan.eval_at)
    compute, samples_of = [0.0] * nw, [0] * nw
    losses: list[float] = []
    evals = [sim.evaluate(x if sim.math else None, 0.0, 0, 0, losses)]
    sim.eval_load(eng)  # the snapshot at 0, evaluated beside the first steps
    step_work = cl.master_update_s * (1 + MEAN_PASS * nw)
    arrived: set[int] = set()
    k, end = [0], [0.0]

    def broadcast() -> None:
        for i in range(nw):
            eng.at(cl.transfer(eng.now, MASTER, i), lambda i=i: start(i))

    def start(i: int) -> None:
        def computed(c: float) -> None:
            compute[i] += c
            eng.at(cl.transfer(eng.now, i, MASTER), lambda: gathered(i))
        cl.gradient(eng, i, computed)

    def gathered(i: int) -> None:
        arrived.add(i)
        if len(arrived) == nw:
            arrived.clear()
            cl.master_update(eng, master, step, work=step_work)

    def step() -> None:
        k[0] += 1
        counts = shares
        if sim.math:  # every worker's gradient at the model it was sent: x, before the step
            grads = [sim.oracle.gradient(i, x) for i in range(nw)]
            counts = [b for _, b, _ in grads]
            losses.append(sum(loss * b for loss, b, _ in grads) / sum(counts))
            syncps_step(opt, x, n, [m for _, _, m in grads], counts, state,
                        opt.lr_at(k[0], total), scratch)
        for i, b in enumerate(counts):
            samples_of[i] += b
        if k[0] in points:
            evals.append(sim.evaluate(x if sim.math else None, eng.now, sum(samples_of),
                                      k[0], losses))
            sim.eval_load(eng)
        if k[0] >= total:
            end[0] = eng.now
            eng.stop()
            return
        broadcast()

    broadcast()
    eng.run()
    wall = end[0]
    workers = _workers(cfg, [total] * nw, samples_of, compute, wall)
    result = _result(sim, wall, total, sum(samples_of), evals, {0: total}, workers,
                     x if sim.math else None)
    if evals and wall > 0:
        evals[-1].extra["master_busy"] = master.busy_until(wall) / wall
    return result, eng.events


__all__ = ["simulate", "share_times", "Oracle", "SIM_MODES", "MEAN_PASS"]
