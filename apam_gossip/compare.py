"""Side-by-side comparison of modes on the same model, data, seed and sample budget."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import MODES, RunConfig
from .errors import UserError
from .files import atomic_write_bytes, atomic_write_text
from .placement import available_cores
from .result import RunResult, format_metric, target_text
from .runner import Callback, check_runnable, run


def fair_share(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the core budget every mode gets in ``compare`` and ``bench``: each
    process that computes gradients has ``max(1, cores // workers)`` torch threads, the
    sequential reference included (it is one worker of the same cluster, not a machine
    with every core). A ``threads_per_worker`` set by the user is kept."""
    if cfg.threads_per_worker is not None:
        return cfg
    return cfg.replace(threads_per_worker=max(1, available_cores() // cfg.workers))


def mode_configs(cfg: RunConfig, modes: Sequence[str]) -> list[RunConfig]:
    """One config per mode (only ``mode`` changes, plus the fair core budget), each
    validated and checked runnable before any run starts, so a bad mode or setting fails
    at once instead of after the runs before it."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UserError(f"unknown mode {unknown[0]!r} in --modes; choose from {', '.join(MODES)}")
    cfgs = [fair_share(cfg.replace(mode=m)) for m in modes]
    for c in cfgs:
        check_runnable(c)
    return cfgs


def compare(cfg: RunConfig, modes: Sequence[str] = ("centralized", "decentralized", "sequential"),
            *, dataset: Any = None, callback: Callback | None = None, on_result=None,
            **task: Any) -> list[RunResult]:
    """Run ``cfg`` once per mode (only ``mode`` changes) and return the results in order.
    ``task``: a user's ``model``, ``train_data``/``test_data``, ``loss``, ``metric`` (as
    for :func:`~apam_gossip.run`), the same for every mode."""
    results = []
    for c in mode_configs(cfg, modes):
        r = run(c, dataset=dataset, callback=callback, **task)
        results.append(r)
        if on_result is not None:
            on_result(r)
    return results


def _fmt_time(t: float | None) -> str:
    return f"{t:.2f}" if t is not None else "-"


def comparison_table(results: Sequence[RunResult], target: float) -> str:
    """A plain-text table: time/samples to ``target`` (of the task's metric, in the
    direction it improves), the final metric, throughput, and the asynchrony measure of
    each mode (staleness, or consensus distance)."""
    r0 = results[0]
    goal = "to " + target_text(r0.metric, r0.higher_is_better, target)
    head = (f"{'mode':<14}{'workers':>8}{'time ' + goal:>21}{'samples to':>12}"
            f"{'final ' + r0.metric:>16}{'samples/s':>11}{'train s':>9}  asynchrony")
    rows = [head, "-" * len(head)]
    for r in results:
        reached = r.first_reaching(target)
        t = reached.wall_time if reached else None
        s = reached.samples if reached else None
        if r.mode == "decentralized":
            last = r.evals[-1].extra if r.evals else {}
            worst = last.get("worst_worker_metric", last.get("worst_worker_acc"))
            asyn = (f"consensus {last.get('consensus_distance', float('nan')):.2e}, "
                    f"worst worker {format_metric(r.metric, worst)}")
        elif r.mode == "centralized":
            asyn = f"staleness mean {r.staleness_mean():.2f} max {max(r.staleness, default=0)}"
        else:
            asyn = "none (reference)"
        rows.append(f"{r.mode:<14}{len(r.workers):>8}{_fmt_time(t):>21}"
                    f"{(str(s) if s is not None else '-'):>12}"
                    f"{format_metric(r.metric, r.final_metric):>16}{r.samples_per_s:>11.0f}"
                    f"{r.wall_time:>9.2f}  {asyn}")
    return "\n".join(rows)


def metric_axis(r: RunResult) -> tuple[float, str]:
    """How to plot a metric: (scale, axis label)."""
    if r.metric == "accuracy":
        return 100.0, "test accuracy (%)"
    return 1.0, f"test {r.metric} ({'higher' if r.higher_is_better else 'lower'} is better)"


def plot_comparison(results: Sequence[RunResult], path: str | Path, target: float | None = None,
                    title: str = "") -> None:
    """PNG: the test metric vs wall time (left) and vs samples seen (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_t, ax_s = fig.subplots(1, 2, sharey=True)
    scale, ylabel = metric_axis(results[0])
    for r in results:
        label = f"{r.mode} ({len(r.workers)} worker{'s' if len(r.workers) > 1 else ''})"
        ax_t.plot([e.wall_time for e in r.evals], [scale * e.test_metric for e in r.evals],
                  marker="o", ms=3, label=label)
        ax_s.plot([e.samples for e in r.evals], [scale * e.test_metric for e in r.evals],
                  marker="o", ms=3, label=label)
    for ax, xl in ((ax_t, "wall time (s, training only)"), (ax_s, "samples seen")):
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
        if target is not None:
            ax.axhline(scale * target, color="grey", ls="--", lw=0.8)
    ax_t.set_ylabel(ylabel)
    ax_s.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(Path(path), buf.getvalue())


def save_comparison(results: Sequence[RunResult], path: str | Path, target: float) -> None:
    atomic_write_text(Path(path), json.dumps(
        {"target": target, "runs": [r.to_dict() for r in results]}, indent=2) + "\n")
