"""Summarize benchmarks/validate_simulator.sh's runs: real against simulated samples/s,
time to the target, staleness and final accuracy, mean ± sd over the seeds.

    python benchmarks/validate_simulator.py OUT_DIR
"""

from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path


def time_to(run: dict, target: float) -> float | None:
    return next((e["wall_time"] for e in run["evals"] if e["test_metric"] >= target), None)


def main(out: Path) -> None:
    for p in ("validation4", "validation"):
        seeds = sorted(int(f.stem.split("-s")[-1]) for f in out.glob(f"real-{p}-s*.json"))
        for mode in ("centralized", "decentralized"):
            cols: dict[str, tuple[list, list]] = {k: ([], []) for k in
                                                  ("samples/s", "time to target", "staleness",
                                                   "final")}
            close = pairs = 0
            for seed in seeds:
                real = json.loads((out / f"real-{p}-s{seed}.json").read_text())
                sim = json.loads((out / f"sim-{p}-s{seed}-{mode}.json").read_text())
                runs = real["runs"][mode], sim["runs"][mode]
                ts = [time_to(r, real["target"]) for r in runs]
                for k, r in enumerate(runs):
                    cols["samples/s"][k].append(r["samples_per_s"])
                    cols["time to target"][k].append(ts[k])
                    cols["staleness"][k].append(r["staleness_mean"])
                    cols["final"][k].append(r["final_metric"])
                pairs += 1
                close += bool(ts[0] and ts[1] and abs(ts[1] - ts[0]) <= 0.15 * ts[0])
            parts = [f"{p} {mode} ({len(seeds)} seeds)"]
            for name, (real_v, sim_v) in cols.items():
                r = [v for v in real_v if v is not None]
                s = [v for v in sim_v if v is not None]
                if not r or not s:
                    parts.append(f"{name}: not reached")
                    continue
                mr, ms = st.mean(r), st.mean(s)
                sd = (lambda v: st.stdev(v) if len(v) > 1 else 0.0)
                parts.append(f"{name} real {mr:.4g}±{sd(r):.2g} sim {ms:.4g}±{sd(s):.2g} "
                             f"({100 * (ms - mr) / mr:+.1f}%; reached {len(r)} vs {len(s)})"
                             if name == "time to target" else
                             f"{name} real {mr:.4g}±{sd(r):.2g} sim {ms:.4g}±{sd(s):.2g} "
                             f"({100 * (ms - mr) / mr:+.1f}%)")
            parts.append(f"single seeds within 15% on time to target: {close}/{pairs}")
            print("\n  ".join(parts))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
