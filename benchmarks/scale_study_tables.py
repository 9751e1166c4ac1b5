"""Markdown tables of the scale study (BENCHMARKS.md, "The scale study") from the JSONs that
`apam-gossip simulate launch/study/P.toml [--timing-only] --scale ...` wrote:

    python benchmarks/scale_study_tables.py benchmarks/scale_study
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROFILES = ("one_slow_in_8", "stragglers", "master_link_1m", "master_link_25m")
MODES = ("allreduce-amsgrad", "dpsgd", "centralized", "gossip-ring", "gossip-exponential")
SHORT = {"allreduce-amsgrad": "all-reduce", "dpsgd": "D-PSGD", "centralized": "APAM",
         "gossip-ring": "gossip ring", "gossip-exponential": "gossip exp."}


def cell_timing(r: dict) -> str:
    s = f"{r['speedup_throughput']:.2f}x ({r['efficiency']:.0%})"
    if r["mode"] == "centralized":
        s += f" cpu/nic {r['master_busy']:.0%}/{r['master_nic_busy']:.0%}"
    return s


def cell_math(r: dict) -> str:
    if r["speedup_to_target"] is not None:
        s = f"{r['speedup_to_target']:.1f}x"
    elif r.get("speedup_to_target_at_least") is not None:
        s = f">{r['speedup_to_target_at_least']:.1f}x"
    else:
        s = "never"
    return f"{s} ({r['final_metric']:.1%})"


def table(rows: list[dict], cell) -> list[str]:
    sizes = sorted({r["workers"] for r in rows})
    by = {(r["workers"], r["mode"]): r for r in rows}
    out = ["| workers | " + " | ".join(SHORT[m] for m in MODES) + " |",
           "|---|" + "---|" * len(MODES)]
    for n in sizes:
        out.append(f"| {n} | " + " | ".join(cell(by[n, m]) if (n, m) in by else "-"
                                           for m in MODES) + " |")
    return out


def main(folder: Path) -> None:
    for p in PROFILES:
        for kind, cell, what in (("timing", cell_timing, "epoch-time speed-up over "
                                  "all-reduce (throughput as a share of the ceiling)"),
                                 ("math", cell_math, "time-to-target speed-up over "
                                  "all-reduce (final accuracy)")):
            f = folder / f"{kind}-{p}.json"
            if not f.exists():
                continue
            d = json.loads(f.read_text())
            print(f"**{d['profile']}**, {what}:\n")
            print("\n".join(table(d["rows"], cell)) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
