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
            quiet: bool = False, log: str | Sequence[str] | None = None,
            **task: Any) -> list[RunResult]:
    """Run ``cfg`` once per mode (only ``mode`` changes) and return the results in order.
    ``task``: a user's ``model``, ``train_data``/``test_data``, ``loss``, ``metric`` (as
    for :func:`~apam_gossip.run`), the same for every mode. ``quiet`` and ``log`` as for
    :func:`~apam_gossip.run`, each mode logging apart (``tensorboard:DIR/<mode>``,
    ``jsonl:PATH-<mode>.jsonl``)."""
    from .runlog import as_specs, spec_for

    results = []
    specs = as_specs(log)
    for c in mode_configs(cfg, modes):
        r = run(c, dataset=dataset, callback=callback, quiet=quiet,
                log=[spec_for(s, c.mode) for s in specs], **task)
        results.append(r)
        if on_result is not None:
            on_result(r)
    return results


def _fmt_time(t: float | None) -> str:
    return f"{t:.2f}" if t is not None else "-"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# config keys that say nothing about what was run (where it was written, how long it may
# take)
_NOT_A_DIFFERENCE = {"checkpoint", "checkpoint_every_s", "timeout_s", "transport", "mode"}


def run_labels(results: Sequence[RunResult]) -> list[str]:
    """A label per run: its mode, and where several runs share a mode, the config values
    that tell them apart (``decentralized topology=ring``), or ``#2`` for a rerun."""
    labels = [r.mode for r in results]
    for mode in set(labels):
        same = [i for i, r in enumerate(results) if r.mode == mode]
        if len(same) < 2:
            continue
        flats = [_flat(results[i].config) for i in same]
        keys = sorted({k for f in flats for k in f} - _NOT_A_DIFFERENCE)
        differ = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
        for n, (i, f) in enumerate(zip(same, flats, strict=True)):
            parts = [f"{k.removeprefix('optim.').removeprefix('data.')}={_short(f.get(k))}"
                     for k in differ[:3]]
            labels[i] += " " + (" ".join(parts) if parts else f"#{n + 1}")
    return labels


def _short(v: Any) -> str:
    if isinstance(v, list | tuple):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) or "-"
    return f"{v:g}" if isinstance(v, float) else str(v)


def comparison_table(results: Sequence[RunResult], target: float) -> str:
    """A plain-text table: time/samples to ``target`` (of the task's metric, in the
    direction it improves), the final metric, throughput, and the asynchrony measure of
    each mode (staleness, or consensus distance)."""
    r0 = results[0]
    labels = run_labels(results)
    width = max(14, *(len(label) + 2 for label in labels))
    goal = "to " + target_text(r0.metric, r0.higher_is_better, target)
    head = (f"{'run':<{width}}{'workers':>8}{'time ' + goal:>21}{'samples to':>12}"
            f"{'final ' + r0.metric:>16}{'samples/s':>11}{'train s':>9}  asynchrony")
    rows = [head, "-" * len(head)]
    for label, r in zip(labels, results, strict=True):
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
        rows.append(f"{label:<{width}}{len(r.workers):>8}{_fmt_time(t):>21}"
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
    """PNG: the test metric vs wall time (left) and vs samples seen (right).

    An evaluation scored on another number of test samples than the run's others (the
    final one, on the whole test set, after evaluations on a subset: ``--eval-samples``)
    is drawn as a separate star, not joined to the curve, so a curve never seems to jump
    at its end. The y-axis shows the band the runs spend their time in (the first
    evaluations of an untrained model are left below it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax_t, ax_s = fig.subplots(1, 2, sharey=True)
    scale, ylabel = metric_axis(results[0])
    shown: list[float] = []
    starred = False
    for label, r in zip(run_labels(results), results, strict=True):
        label += f" ({len(r.workers)} worker{'s' if len(r.workers) > 1 else ''})"
        n_eval = [e.extra.get("eval_samples") for e in r.evals]
        usual = max(set(n_eval), key=n_eval.count) if n_eval else None
        curve = [e for e, n in zip(r.evals, n_eval, strict=True) if n == usual]
        apart = [e for e, n in zip(r.evals, n_eval, strict=True) if n != usual]
        for ax, x in ((ax_t, lambda e: e.wall_time), (ax_s, lambda e: e.samples)):
            (line,) = ax.plot([x(e) for e in curve], [scale * e.test_metric for e in curve],
                              marker="o", ms=3, label=label)
            if apart:
                ax.plot([x(e) for e in apart], [scale * e.test_metric for e in apart],
                        ls="none", marker="*", ms=9, color=line.get_color())
        starred = starred or bool(apart)
        values = [scale * e.test_metric for e in r.evals]
        shown += values[len(values) // 4:]  # the later three quarters of the run
    if shown:
        lo, hi = min(shown), max(shown)
        if target is not None:
            lo, hi = min(lo, scale * target), max(hi, scale * target)
        pad = max(0.05 * (hi - lo), 1e-3 * max(abs(hi), 1.0))
        ax_t.set_ylim(lo - pad, hi + pad)
    for ax, xl in ((ax_t, "wall time (s, training only)"), (ax_s, "samples seen")):
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
        if target is not None:
            r0 = results[0]
            ax.axhline(scale * target, color="grey", ls="--", lw=0.8,
                       label="target " + target_text(r0.metric, r0.higher_is_better, target))
    if starred:
        ax_s.plot([], [], ls="none", marker="*", ms=9, color="grey",
                  label="scored on the whole test set")
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
