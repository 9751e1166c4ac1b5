"""The APAM paper's LeNet5 table on the simulator (BENCHMARKS.md, issue 23): APAM and the
paper's synchronous parameter server (syncps) at 1, 2, 5, 10 and 20 workers on one node,
timing only, with the profile launch/study/apam_lenet5_node.toml (the paper machine's
costs; the contention curve measured on this machine, or given with --curve).

    python benchmarks/apam_paper_node.py [--curve 1,1.05,...] [--cores N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from apam_gossip.data import load_dataset
from apam_gossip.profiles import load_profile
from apam_gossip.sim import simulate
from apam_gossip.sim.contention import resolve_hardware

ROOT = Path(__file__).resolve().parents[1]
# the paper's wall times (s), 200 epochs, by workers (APAM, the authors' repository)
PAPER_APAM = {1: 1661.89, 2: 821.95, 5: 369.88, 10: 233.73, 20: 145.51}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--curve", help="contention factors for 1.. co-running workers "
                    "(default: measured here, up to this machine's cores)")
    ap.add_argument("--cores", type=int, help="the node's cores (default: the profile's)")
    ap.add_argument("-o", "--output", help="JSON of the rows")
    a = ap.parse_args()
    profile = load_profile(ROOT / "launch/study/apam_lenet5_node.toml")
    costs = dict(profile.sim_costs)
    hw = costs.pop("hardware")
    if a.cores:
        hw = dataclasses.replace(hw, cores_per_node=a.cores)
    dataset = load_dataset(profile.base.data.dataset)
    if a.curve:
        hw = hw.with_curve([float(v) for v in a.curve.split(",")])
    else:
        hw = resolve_hardware(hw, profile.base, dataset)
    print(f"contention curve: {list(hw.contention)} (cores per node {hw.cores_per_node})")
    rows = []
    for n in sorted(PAPER_APAM):
        row = {"workers": n}
        for mode in ("centralized", "syncps"):
            cfg = profile.base.replace(mode=mode, workers=n)
            r = simulate(cfg, dataset=dataset, timing_only=True, hardware=hw, **costs)
            row[mode] = r.wall_time
        rows.append(row)
    one = rows[0]["centralized"]
    print(f"{'workers':>7} {'APAM s':>9} {'speed-up':>9} {'paper':>7} {'off':>7} "
          f"{'syncps s':>9} {'syncps/APAM':>12}")
    for r in rows:
        n = r["workers"]
        paper = PAPER_APAM[1] / PAPER_APAM[n]
        sim = one / r["centralized"]
        print(f"{n:>7} {r['centralized']:>9.1f} {sim:>8.2f}x {paper:>6.2f}x "
              f"{100 * (sim - paper) / paper:>+6.1f}% {r['syncps']:>9.1f} "
              f"{r['syncps'] / r['centralized']:>11.2f}x")
    if a.output:
        Path(a.output).write_text(json.dumps({"curve": list(hw.contention), "rows": rows},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
