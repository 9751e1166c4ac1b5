"""The scale study: every mode's speed-up over synchronous all-reduce as the cluster grows.

For each number of workers the profile is scaled (:func:`apam_gossip.profiles.scaled`:
its per-worker settings repeat) and every mode simulated on the same budget: all-reduce
(AMSGrad), D-PSGD, APAM and gossip on a ring and on the exponential graph. Timing-only
(throughput: the speed-up is the ratio of epoch times, over a budget of at least 50
updates per worker so that start-up does not count), or in math mode (the CLI's default,
``simulate --scale``) the time to the profile's target too. The model is timed once for
all runs.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes
from ..profiles import ClusterProfile, scaled
from .cluster import per_worker
from .run import simulate

STUDY_MODES: dict[str, tuple[str, dict[str, Any]]] = {
    "allreduce-amsgrad": ("allreduce-amsgrad", {}),
    "dpsgd": ("dpsgd", {}),
    "centralized": ("centralized", {}),
    "gossip-ring": ("decentralized", {"topology": "ring"}),
    "gossip-exponential": ("decentralized", {"topology": "exponential"}),
}


def scale_study(profile: ClusterProfile, workers: list[int], dataset: Any,
                timing_only: bool = True, modes: dict[str, tuple[str, dict]] | None = None,
                **costs: Any) -> list[dict]:
    """One row per (workers, mode): samples/s, speed-up over all-reduce (epoch time, and
    time to target in math mode), staleness and, for the master, its busy fraction.
    ``modes``: name -> (bench mode, config overrides), all-reduce first (default
    :data:`STUDY_MODES`; e.g. ``("centralized", {"master_shards": 4})``)."""
    modes = STUDY_MODES if modes is None else modes
    from ..plan import total_updates
    from ..task import make_task
    from .cluster import calibrate

    if "hardware" in costs:  # a contention curve to measure: once for every size
        from .contention import resolve_hardware

        costs = {**costs, "hardware": resolve_hardware(costs["hardware"], profile.base,
                                                       dataset)}
    if not {"gradient_s", "master_update_s"} <= set(costs):  # time the model once
        task = make_task(profile.base, dataset, check=False)
        g, u = calibrate(task, dataset, profile.base)
        if costs.get("model_params"):  # an optimizer step is linear in the model size
            u *= costs["model_params"] / task.initial_state()[1]
        costs = {"gradient_s": g, "master_update_s": u, **costs}
    costs.setdefault("worker_update_s", costs["master_update_s"])
    rows = []
    for n in workers:
        p = scaled(profile, n)
        base_sps = base_t = base_wall = None
        ceiling = _ceiling(p, costs["gradient_s"])
        for name, (bench_mode, over) in modes.items():
            cfg = p.config_for(bench_mode).replace(**over)
            if timing_only:  # a steady state: at least 50 updates per worker
                budget = total_updates(cfg, dataset.train_size())
                cfg = cfg.replace(steps=max(budget, 50 * n))
            r = simulate(cfg, dataset=dataset, timing_only=timing_only, **costs)
            t = r.time_to_target(p.target) if not timing_only else None
            if name == "allreduce-amsgrad":
                base_sps, base_t, base_wall = r.samples_per_s, t, r.wall_time
            # all-reduce short of the target within the budget: its whole run is a lower
            # bound on its time to target, so the speed-up is at least base_wall / t
            beyond = not timing_only and base_t is None and t is not None
            rows.append({
                "workers": n, "mode": name, "samples_per_s": r.samples_per_s,
                "speedup_throughput": r.samples_per_s / base_sps if base_sps else None,
                "efficiency": r.samples_per_s / ceiling,
                "time_to_target_s": t,
                "speedup_to_target": base_t / t if base_t and t else None,
                "speedup_to_target_at_least": base_wall / t if beyond else None,
                "staleness_mean": r.staleness_mean(),
                "master_busy": r.evals[-1].extra.get("master_busy") if r.evals else None,
                "master_nic_busy": r.evals[-1].extra.get("master_nic_busy")
                if r.evals else None,
                "final_metric": r.final_metric, "virtual_s": r.wall_time,
                "events": r.simulation["events"],
                "n_params_bytes": 4 * (costs.get("model_params") or r.n_params),
                # the curve, so that time to any other target can be read off later
                "curve": [[e.wall_time, e.test_metric] for e in r.evals]
                if not timing_only else None,
            })
    return rows


def _ceiling(profile: ClusterProfile, gradient_s: float | list[float]) -> float:
    """Samples/s if every worker only computed: the sum of the workers' isolated
    throughputs (slowdowns and the expected straggler delay included)."""
    cfg = profile.base
    expected = 1 + cfg.straggler_prob * (cfg.straggler_factor - 1)
    g = per_worker(gradient_s, cfg.workers)
    return sum(cfg.data.batch_size / (g[i] * cfg.slowdown_of(i) * expected)
               for i in range(cfg.workers))


def _master(row: dict) -> str:
    """The master's busy fractions: its update loop / its NIC's busier direction."""
    if row.get("master_busy") is None:
        return "-"
    nic = row.get("master_nic_busy")
    return f"{row['master_busy']:.0%}/{nic:.0%}" if nic is not None else \
        f"{row['master_busy']:.0%}"


def _to_target(row: dict) -> str:
    if row["speedup_to_target"] is not None:
        return f"{row['speedup_to_target']:.2f}"
    if row.get("speedup_to_target_at_least") is not None:
        return f">{row['speedup_to_target_at_least']:.2f}"
    return "-"


def study_table(rows: list[dict]) -> str:
    def f(v, fmt):
        return format(v, fmt) if v is not None and v == v else "-"

    head = (f"{'workers':>8} {'mode':<20}{'samples/s':>12}{'efficiency':>11}{'speed-up':>10}"
            f"{'to target s':>13}{'speed-up':>10}{'final':>8}{'staleness':>11}"
            f"{'master cpu/nic':>16}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['workers']:>8} {r['mode']:<20}{r['samples_per_s']:>12.0f}"
                     f"{f(r.get('efficiency'), '.0%'):>11}"
                     f"{f(r['speedup_throughput'], '.2f'):>10}"
                     f"{f(r['time_to_target_s'], '.1f'):>13}"
                     f"{_to_target(r):>10}{f(r['final_metric'], '.3f'):>8}"
                     f"{r['staleness_mean']:>11.1f}{_master(r):>16}")
    lines.append("efficiency: samples/s over the sum of the workers' isolated throughputs; "
                 "master cpu/nic: the busy fraction of its update loop and of its NIC; "
                 "speed-up: over synchronous all-reduce (AMSGrad) at the same size, by "
                 "throughput (epoch time) and, in math mode, by virtual time to the target "
                 "(- : not reached within the budget; >x: all-reduce did not reach it, x "
                 "counts its whole run)")
    return "\n".join(lines)


def plot_study(rows: list[dict], path: Path, title: str,
               modes: dict[str, tuple[str, dict]] | None = None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    math = any(r["time_to_target_s"] is not None for r in rows)
    fig = Figure(figsize=(12 if math else 7, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if math else 1, squeeze=False)[0]
    panels = [("speedup_throughput", "speed-up over all-reduce (epoch time)")]
    if math:
        panels.append(("speedup_to_target", "speed-up over all-reduce (time to target)"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for mode in (STUDY_MODES if modes is None else modes):
            pts = [(r["workers"], r[key] if r[key] is not None else
                    r.get(f"{key}_at_least")) for r in rows if r["mode"] == mode]
            pts = [p for p in pts if p[1] is not None]
            if pts:
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                                label=mode)
            bounds = [(r["workers"], r[f"{key}_at_least"]) for r in rows
                      if r["mode"] == mode and r.get(f"{key}_at_least") is not None]
            if bounds:  # all-reduce never got there: at least this much (an up-arrow)
                ax.scatter([b[0] for b in bounds], [b[1] for b in bounds], marker="^", s=40,
                           color=line.get_color(), zorder=3)
        if key == "speedup_to_target" and any(r.get(f"{key}_at_least") for r in rows):
            ax.text(0.01, 0.01, "^ : all-reduce missed the target; a lower bound",
                    transform=ax.transAxes, fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        sizes = sorted({r["workers"] for r in rows})
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("workers")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


__all__ = ["scale_study", "study_table", "plot_study", "STUDY_MODES"]
