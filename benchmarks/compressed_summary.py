"""Per-seed numbers of the issue-25 bench runs (benchmarks/compressed_real.sh): final
accuracy, time to the profile's target, samples/s, bytes per average, consensus distance
and worker 0's chosen neighbours, for each mode and seed of each bench JSON given.

    python benchmarks/compressed_summary.py OUT/one_slow.json OUT/slow_links.json
"""

from __future__ import annotations

import json
import statistics
import sys


def time_to(run: dict, target: float) -> float | None:
    for e in run["evals"]:
        if e["test_metric"] is not None and e["test_metric"] >= target:
            return e["wall_time"]
    return None


def main() -> None:
    for path in sys.argv[1:]:
        doc = json.load(open(path))
        target = doc["target"]
        seeds = doc.get("seed_runs") or [doc["runs"]]
        print(f"{doc['profile']} (target {target:.0%}), {len(seeds)} seed(s)")
        for mode in seeds[0]:
            accs, times, sps = [], [], []
            for k, runs in enumerate(seeds):
                r = runs[mode]
                extra = r["evals"][-1]["extra"]
                t = time_to(r, target)
                accs.append(r["final_metric"])
                times.append(t)
                sps.append(r["samples_per_s"])
                nb = r["workers"][0].get("neighbours")
                print(f"  {mode:<20} seed {k}: final {r['final_metric']:.2%}  to target "
                      f"{'-' if t is None else f'{t:.1f} s'}  {r['samples_per_s']:.0f} "
                      f"samples/s  bytes/avg {extra.get('bytes_per_average', '-')}  "
                      f"consensus {extra.get('consensus_distance', float('nan')):.2e}  "
                      f"worker 0 chose {nb}")
            reached = [t for t in times if t is not None]
            print(f"  {mode:<20} mean: final {statistics.mean(accs):.2%} (spread "
                  f"{min(accs):.2%}-{max(accs):.2%})  to target "
                  f"{statistics.mean(reached):.1f} s ({len(reached)}/{len(times)} reached)"
                  if reached else f"  {mode:<20} mean: final {statistics.mean(accs):.2%}, "
                  "target not reached")


if __name__ == "__main__":
    main()
