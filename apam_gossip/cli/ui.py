"""The terminal: the live progress line of a run and its summary at the end."""

from __future__ import annotations

from ..progress import ProgressPrinter
from ..result import format_metric

_ProgressUI = ProgressPrinter  # the name the command line has used


def summary_text(r) -> str:
    """A human summary of a RunResult."""
    lines = [
        f"{r.mode} ({r.transport}): {r.updates} updates, {r.samples} samples in "
        f"{r.wall_time:.2f} s ({r.samples_per_s:.0f} samples/s); "
        f"final test {r.metric} {format_metric(r.metric, r.final_metric)}",
    ]
    if r.mode == "decentralized" and r.evals and "consensus_distance" in r.evals[-1].extra:
        x = r.evals[-1].extra
        worst = x.get("worst_worker_metric")
        lines.append(f"averaged model x_bar: {format_metric(r.metric, r.final_metric)}; "
                     + (f"worst worker {format_metric(r.metric, worst)}; "
                        if worst is not None else "")
                     + "consensus distance "
                     f"{x['consensus_distance']:.3e}; {x['averages']} pairwise averages"
                     + (f" ({x['refused_averages']} refused: the peer was mid-average)"
                        if x.get("refused_averages") else "")
                     + (f"; audit: sum of models off by {x['audit_error']:.1e} (relative)"
                        if "audit_error" in x else "")
                     + (f", sum of u - vhat off by {x['audit_u_error']:.1e}"
                        if "audit_u_error" in x else ""))
    if r.mode in ("centralized", "decentralized") and r.staleness:
        mx = max(r.staleness)
        lines.append(f"staleness: mean {r.staleness_mean():.2f}, max {mx}; histogram "
                     + " ".join(f"{k}:{v}" for k, v in sorted(r.staleness.items())[:12])
                     + (" ..." if len(r.staleness) > 12 else ""))
    if r.failed_workers:
        lines.append(f"workers that died during the run (the run went on without them): "
                     f"{', '.join(map(str, r.failed_workers))}")
    if len(r.workers) > 1:
        lines.append("worker  slowdown  updates  samples/s  compute_s  device")
        for w in r.workers:
            lines.append(f"{w.worker:>6}  {w.slowdown:>8g}  {w.updates:>7}  "
                         f"{w.samples_per_s:>9.0f}  {w.compute_s:>9.2f}  {w.device}")
    return "\n".join(lines)


