"""The end of a loop-API job: what ``finish()`` returns (:class:`LoopSummary`), the job's
:class:`~apam_gossip.result.RunResult` as ``train`` writes one (:func:`loop_result`), and the
per-rank summary rank 0 prints."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor

from ..config import OptimConfig
from ..messages import LoopReport
from ..result import EvalRecord, RunResult, WorkerStats
from .base import PROG, TRAITS, Session


@dataclass
class LoopSummary:
    """What ``finish()`` returns: this rank's report (rank 0: every rank's) and, on rank 0,
    the job's RunResult."""

    rank: int
    reports: list[LoopReport]
    result: RunResult | None

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "reports": [asdict(r) for r in self.reports]}


def merged(reports: list[LoopReport]) -> dict[int, int]:
    out: Counter[int] = Counter()
    for r in reports:
        out.update({int(k): v for k, v in r.staleness.items()})
    return dict(out)


def loop_result(s: Session, hp: OptimConfig, lr0: float, reports: list[LoopReport],
                n_params: int, final: Tensor, metric: float | None, metric_name: str,
                higher_is_better: bool, extra: dict[str, float], staleness: dict[int, int],
                updates: int) -> RunResult:
    """The job's RunResult, as ``train`` writes one (``compare --results`` reads it); its
    one evaluation is the end of the run, with the metric the user measured (if any).
    ``final``: the final model (centralized: the master's; decentralized: the average;
    allreduce: the common replica)."""
    wall = max((r.wall_time for r in reports), default=0.0)
    samples = sum(r.samples for r in reports)
    workers = [WorkerStats.of(i, r.device, 1.0, r.steps, r.samples, wall,
                              r.wall_time - r.step_s) for i, r in enumerate(reports)]
    for w, r in zip(workers, reports, strict=True):
        if r.neighbours is not None:  # gossip: the distribution each rank chose
            w.neighbours = {str(j): int(c) for j, c in sorted(r.neighbours.items())}
    value = float("nan") if metric is None else float(metric)
    ev = EvalRecord(wall, samples, updates, None, float("nan"), value, dict(extra))
    optim = {**hp.model_dump(), "lr": lr0}
    config = {"mode": s.mode, "workers": len(reports), "api": "loop", "seed": s.seed,
              "optim": optim, "topology": s.topology if s.traits.gossip else None,
              "adaptive_state": s.adaptive_state}
    if s.n_masters > 1:
        config["master_shards"] = s.n_masters
    transport = getattr(s.comm, "transport_name", "mpi") if s.comm is not None else "local"
    return RunResult.of(config, s.mode, transport, n_params,
                        wall, updates, [ev], staleness, workers, final.detach().cpu().clone(),
                        samples=samples, metric=metric_name,
                        higher_is_better=higher_is_better, task={"api": "loop"})


def summary_table(result: RunResult, reports: list[LoopReport]) -> str:
    """The per-rank summary rank 0 prints at the end."""
    traits = TRAITS[result.mode]
    first = result.config.get("master_shards", 1) if traits.master \
        and result.transport == "mpi" else 0
    lines = [f"{PROG}: {result.mode} finished: {result.updates} updates, {result.samples} "
             f"samples in {result.wall_time:.2f} s ({result.samples_per_s:.0f} samples/s)"]
    if traits.master:
        lines[0] += (f"; staleness mean {result.staleness_mean():.2f} max "
                     f"{max(result.staleness, default=0)}")
    elif traits.gossip:
        c = result.evals[-1].extra.get("consensus_distance")
        if c is not None:
            lines[0] += f"; consensus distance {c:.3e}"
    head = f"  {'rank':>4} {'device':>8} {'steps':>7} {'samples':>9} {'samples/s':>10}"
    if traits.gossip:
        head += f" {'averages':>9} {'refused':>8} {'staleness mean':>15}"
    lines.append(head)
    for i, r in enumerate(reports):
        row = (f"  {i + first:>4} {r.device:>8} {r.steps:>7} {r.samples:>9} "
               f"{r.samples / r.wall_time if r.wall_time > 0 else 0:>10.0f}")
        if traits.gossip:
            n = sum(r.staleness.values())
            mean = sum(int(k) * v for k, v in r.staleness.items()) / n if n else 0.0
            row += f" {r.averages:>9} {r.refused_averages:>8} {mean:>15.2f}"
        lines.append(row)
    return "\n".join(lines)


def finish_rank0(s: Session, result: RunResult, reports: list[LoopReport],
                  quiet: bool) -> None:
    from ..runlog import say

    if not quiet:
        say(summary_table(result, reports))
    if s.metrics is not None:  # init(log=...): the evaluations and the summary
        s.metrics.metric = result.metric
        for e in result.evals:
            s.metrics.eval(e)
        s.metrics.end(result)
    if s.result is not None:
        result.save(s.result)
        if not quiet:
            say(f"{PROG}: result written to {s.result}")
