"""Summarize benchmarks/validate_simulator.sh's runs: real against simulated samples/s,
time to the target, staleness and final accuracy per mode, mean ± sd over the seeds, and
the sign of gossip's overlap (decentralized over decentralized-no-overlap, samples/s).

    python benchmarks/validate_simulator.py OUT_DIR
"""

from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path

PROFILES = ("contended4", "contended8")


def time_to(run: dict, target: float) -> float | None:
    return next((e["wall_time"] for e in run["evals"] if e["test_metric"] >= target), None)


def _ms(v: list[float]) -> str:
    return f"{st.mean(v):.4g}±{st.stdev(v) if len(v) > 1 else 0.0:.2g}"


def main(out: Path) -> None:
    for p in PROFILES:
        seeds = sorted(int(f.stem.split("-s")[-1]) for f in out.glob(f"sim-{p}-s*.json"))
        if not seeds:
            continue
        pairs = [(json.loads((out / f"real-{p}-s{s}.json").read_text()),
                  json.loads((out / f"sim-{p}-s{s}.json").read_text())) for s in seeds]
        plain = [json.loads((out / f"plain-{p}-s{s}.json").read_text()) for s in seeds
                 if (out / f"plain-{p}-s{s}.json").exists()]
        target = pairs[0][0]["target"]
        print(f"\n{p} ({len(seeds)} seeds {seeds}; target {target})")
        print(f"  {'mode':<26}{'samples/s real':>16}{'sim':>14}{'off':>8}"
              f"{'to target real':>16}{'sim':>12}{'off':>8}{'final real':>12}{'sim':>8}")
        for mode in pairs[0][0]["runs"]:
            sps = ([r["runs"][mode]["samples_per_s"] for r, _ in pairs],
                   [s["runs"][mode]["samples_per_s"] for _, s in pairs])
            tt = ([time_to(r["runs"][mode], target) for r, _ in pairs],
                  [time_to(s["runs"][mode], target) for _, s in pairs])
            fin = ([r["runs"][mode]["final_metric"] for r, _ in pairs],
                   [s["runs"][mode]["final_metric"] for _, s in pairs])
            off = 100 * (st.mean(sps[1]) - st.mean(sps[0])) / st.mean(sps[0])
            if all(v is not None for v in tt[0] + tt[1]):
                t_off = 100 * (st.mean(tt[1]) - st.mean(tt[0])) / st.mean(tt[0])
                tcols = f"{_ms(tt[0]):>16}{_ms(tt[1]):>12}{t_off:>+7.1f}%"
            else:
                reached = sum(v is not None for v in tt[0]), sum(v is not None for v in tt[1])
                tcols = f"{f'reached {reached[0]}/{len(seeds)}':>16}" \
                        f"{f'{reached[1]}/{len(seeds)}':>12}{'':>8}"
            before = ""
            if len(plain) == len(seeds):
                p_sps = st.mean(d["runs"][mode]["samples_per_s"] for d in plain)
                before = f"   (no hardware model: {100 * (p_sps / st.mean(sps[0]) - 1):+.0f}%)"
            print(f"  {mode:<26}{_ms(sps[0]):>16}{_ms(sps[1]):>14}{off:>+7.1f}%{tcols}"
                  f"{st.mean(fin[0]):>12.3f}{st.mean(fin[1]):>8.3f}{before}")
        if {"decentralized", "decentralized-no-overlap"} <= set(pairs[0][0]["runs"]):
            gain = [[d["runs"]["decentralized"]["samples_per_s"]
                     / d["runs"]["decentralized-no-overlap"]["samples_per_s"] for d in side]
                    for side in zip(*pairs, strict=True)]
            print(f"  overlap's gain (samples/s with / without): real {_ms(gain[0])}, "
                  f"simulated {_ms(gain[1])}")
        curves = [s["runs"][next(iter(s["runs"]))].get("simulation", {}).get("hardware", {})
                  .get("contention") for _, s in pairs]
        print(f"  contention curves measured just before each real run: {curves}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
