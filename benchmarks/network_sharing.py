"""Gossip against all-reduce on AD-PSGD's kind of cluster (BENCHMARKS.md, issue 23): the
profile launch/study/network_sharing.toml as it is, and with its sharing taken away step
by step, at 16-128 workers, timing only. Prints gossip's speed-up per epoch (samples/s
over all-reduce's) for each variant.

    python benchmarks/network_sharing.py [--workers 16,32,64,128]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from apam_gossip.data import load_dataset
from apam_gossip.profiles import load_profile, scaled
from apam_gossip.sim.run import simulate

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> changes to the profile's Hardware
    "dedicated links": {"background": 0.0, "congestion": 0.0},
    "background 0.5 only": {"congestion": 0.0},
    "the profile": {},
    "the profile, 1 GPU per node": {"workers_per_node": 1},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="16,32,64,128")
    a = ap.parse_args()
    profile = load_profile(ROOT / "launch/study/network_sharing.toml")
    costs = dict(profile.sim_costs)
    hw0 = costs.pop("hardware")
    dataset = load_dataset(profile.base.data.dataset)
    sizes = [int(n) for n in a.workers.split(",")]
    print(f"{'workers':>8} " + "".join(f"{v:>30}" for v in VARIANTS))
    for n in sizes:
        p = scaled(profile, n)
        cells = []
        for changes in VARIANTS.values():
            hw = dataclasses.replace(hw0, **changes)
            sps = {}
            for mode in ("allreduce-amsgrad", "decentralized"):
                cfg = p.config_for(mode).replace(steps=150 * n)
                sps[mode] = simulate(cfg, dataset=dataset, timing_only=True, hardware=hw,
                                     **costs).samples_per_s
            cells.append(sps["decentralized"] / sps["allreduce-amsgrad"])
        print(f"{n:>8} " + "".join(f"{c:>29.2f}x" for c in cells), flush=True)


if __name__ == "__main__":
    main()
