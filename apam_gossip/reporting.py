"""What every runner reports, written once: progress events, snapshot scoring, worker
statistics, the RunResult of each mode, and the gossip audit.

Both the shared-memory runner (:mod:`apam_gossip.runtime.shm`) and the MPI runner
(:mod:`apam_gossip.runtime.mpi`) build their results here, so a RunResult means the same
whichever transport produced it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .config import RunConfig
from .core.consensus import consensus
from .evaluate import Evaluator
from .messages import MasterSummary, Snapshot, WorkerReport
from .result import EvalRecord, RunResult, WorkerStats
from .task import Task

WORKER_EVAL_SAMPLES = 2000  # test samples used to score each gossip worker's own model


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


def no_callback(ev: Event) -> None:
    """The callback of a run nobody watches."""


class SnapshotScorer:
    """Scores the models that :class:`~apam_gossip.messages.Snapshot` messages announce
    (the model sits in ``snaps[msg.slot]``) into EvalRecords, and keeps the final model.

    The final snapshot of a run whose last evaluation point already scored the same
    model (same update count) is not scored twice."""

    def __init__(self, evaluator: Evaluator, snaps: torch.Tensor, total_samples: int,
                 cb: Callback) -> None:
        self.evaluator, self.snaps, self.total_samples, self.cb = (
            evaluator, snaps, total_samples, cb)
        self.evals: list[EvalRecord] = []
        self.final_params: torch.Tensor | None = None

    def __call__(self, msg: Snapshot) -> None:
        params = self.snaps[msg.slot]
        if msg.final:
            self.final_params = params.clone()
            if self.evals and self.evals[-1].updates == msg.updates:
                return
        loss, acc = self.evaluator(params)
        rec = EvalRecord(msg.wall, msg.samples, msg.updates, msg.train_loss, loss, acc,
                         extra=dict(msg.extra))
        self.evals.append(rec)
        self.cb(Event("eval", msg.samples, self.total_samples, rec))


def worker_stats(cfg: RunConfig, reports: dict[int, WorkerReport], devices: list[str],
                 wall: float, updates_of: list[int] | None = None,
                 samples_of: list[int] | None = None) -> list[WorkerStats]:
    """One WorkerStats per worker, in worker order. ``updates_of``/``samples_of`` (the
    centralized master's counts of what it applied) replace the workers' own counts; a
    worker with no report (it died) has zero timing."""
    out = []
    for i in range(cfg.workers):
        r = reports.get(i) or WorkerReport(i, devices[i], 0.0, 0.0)
        updates = updates_of[i] if updates_of is not None else r.updates
        samples = samples_of[i] if samples_of is not None else r.samples
        ws = WorkerStats.of(i, devices[i], cfg.slowdown_of(i), updates, samples, wall,
                            r.compute_s, r.sleep_s)
        ws.overlap, ws.overlap_probe = r.overlap, r.overlap_probe
        if r.neighbours is not None:
            ws.neighbours = {str(j): int(c) for j, c in sorted(r.neighbours.items())}
        out.append(ws)
    return out


def with_task(result: RunResult, task: Task) -> RunResult:
    """Record on ``result`` what was trained: the metric, its direction, the model and
    loss (their import strings or names)."""
    info = task.describe()
    result.metric, result.higher_is_better, result.task = (
        info["metric"], info["higher_is_better"], info)
    return result


def centralized_result(cfg: RunConfig, summary: MasterSummary,
                       reports: dict[int, WorkerReport], devices: list[str],
                       scorer: SnapshotScorer, n_params: int, transport: str,
                       failed: Iterable[int] = (), mode: str = "centralized") -> RunResult:
    """The RunResult of APAM (or of another ``mode`` with a master: syncps) from the
    master's summary and the workers' reports; its provenance names the device the
    master ran on (``master_device = "auto"`` settles on one)."""
    from .placement import master_device
    from .result import provenance

    wall = summary.wall_time
    prov = provenance(wall) | {"master_device": str(master_device(cfg))}
    return RunResult.of(
        cfg.to_dict(), mode, transport, n_params, wall, summary.updates,
        scorer.evals, dict(summary.staleness),
        worker_stats(cfg, reports, devices, wall, summary.updates_of, summary.samples_of),
        scorer.final_params, samples=summary.samples,
        failed=set(failed) | set(summary.failed_workers), provenance=prov)


def sync_result(cfg: RunConfig, reports: dict[int, WorkerReport], devices: list[str],
                scorer: SnapshotScorer, rounds: int, n_params: int,
                transport: str) -> RunResult:
    """The RunResult of a synchronous baseline (allreduce, dpsgd)."""
    wall = max(r.wall_time for r in reports.values())
    workers = worker_stats(cfg, reports, devices, wall)
    return RunResult.of(cfg.to_dict(), cfg.mode, transport, n_params, wall, rounds,
                        scorer.evals, {0: rounds}, workers, scorer.final_params)


def syncps_result(cfg: RunConfig, summary: MasterSummary,
                  reports: dict[int, WorkerReport], devices: list[str],
                  scorer: SnapshotScorer, n_params: int, transport: str) -> RunResult:
    """The RunResult of syncps: as APAM's (a master's summary: its steps, the samples
    each worker's gradients brought), every update 0 steps stale."""
    return centralized_result(cfg, summary, reports, devices, scorer, n_params, transport,
                              mode="syncps")


def merge_counts(*counts: dict[int, int]) -> dict[int, int]:
    """Histograms (value -> count) added up."""
    out: dict[int, int] = {}
    for c in counts:
        for k, v in c.items():
            out[int(k)] = out.get(int(k), 0) + int(v)
    return out


def decentralized_result(cfg: RunConfig, reports: dict[int, WorkerReport], wall: float,
                         devices: list[str], evals: list[EvalRecord],
                         final_params: torch.Tensor | None, n_params: int, transport: str,
                         failed: Iterable[int] = (),
                         staleness_before: dict[int, int] | None = None) -> RunResult:
    """The RunResult of gossip from the workers' reports (``staleness_before``: the
    histogram of the runs a resumed run continues)."""
    staleness = merge_counts(staleness_before or {}, *(r.staleness for r in reports.values()))
    workers = worker_stats(cfg, reports, devices, wall)
    return RunResult.of(cfg.to_dict(), "decentralized", transport, n_params, wall,
                        sum(w.updates for w in workers), evals, staleness, workers,
                        final_params, failed=failed)


def gossip_eval_record(cfg: RunConfig, evaluator: Evaluator, xs: torch.Tensor, wall: float,
                       done: int, train_loss: float | None,
                       averages: int | None,
                       per_worker: bool = True) -> tuple[EvalRecord, torch.Tensor]:
    """Score the average model x_bar and, with ``per_worker``, each worker's model;
    returns (record, x_bar).

    The consensus distances are :func:`apam_gossip.core.consensus.consensus`'s."""
    xbar, distances = consensus(xs, evaluator.flat.n_params)
    loss, acc = evaluator(xbar)
    extra: dict[str, Any] = dict(distances)
    if per_worker:
        # each worker's own model on a slice of the test set: n full evaluations per
        # point would steal the workers' CPU on a small machine
        n_test = min(WORKER_EVAL_SAMPLES, evaluator.test_size)
        accs = [evaluator(xs[i], limit=n_test)[1] for i in range(len(xs))] if len(xs) > 1 \
            else [acc]
        worst = min(accs) if evaluator.metric.higher_is_better else max(accs)
        extra.update({"worst_worker_metric": worst, "mean_worker_metric": sum(accs) / len(accs),
                      "worker_eval_samples": n_test})
        if evaluator.metric.name == "accuracy":  # the names results had before metrics
            extra["worst_worker_acc"], extra["mean_worker_acc"] = worst, sum(accs) / len(accs)
    if averages is not None:
        extra["averages"] = averages
    rec = EvalRecord(wall, done * cfg.data.batch_size, done, train_loss, loss, acc,
                     extra=extra)
    return rec, xbar


def mean_train_loss(reports: Iterable[WorkerReport]) -> float | None:
    total = [r.train_loss for r in reports]
    n = sum(c for _, c in total)
    return sum(s for s, _ in total) / n if n else None


# ------------------------------------------------------------------ the gossip audit
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
                 reports: dict[int, WorkerReport]) -> dict[str, float]:
    """Relative errors of the gossip invariants at the end of a run (see --audit):
    ``audit_error``: sum_i x_i(end) vs the start plus every local step; with a tracked u,
    ``audit_u_error``: sum_i (u_i - vhat_i)(end) vs the start, and how far apart the
    workers' u (``u_spread``, gossiped) and vhat (``vhat_spread``, private) are."""
    steps = sum(torch.from_numpy(r.audit) for r in reports.values() if r.audit is not None)
    expect = base.x_sum + steps
    out = {"audit_error": float((xs.double().sum(0) - expect).norm() / expect.norm())}
    if us is not None and base.u_minus_vhat is not None:
        vhats = torch.stack([torch.from_numpy(r.audit_vhat) for r in reports.values()
                             if r.audit_vhat is not None])
        u_sum = us.double().sum(0)
        err = (u_sum - vhats.sum(0) - base.u_minus_vhat).norm() / u_sum.norm().clamp(min=1e-300)
        out["audit_u_error"] = float(err)
        out["u_spread"] = _spread(us.double())
        out["vhat_spread"] = _spread(vhats)
    return out


def _spread(rows: torch.Tensor) -> float:
    """mean_i |r_i - mean r|^2 / |mean r|^2."""
    mean = rows.mean(0)
    return float(((rows - mean) ** 2).sum(1).mean() / (mean**2).sum().clamp(min=1e-300))
