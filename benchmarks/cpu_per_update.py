"""CPU time per update of a real run, per process (issue 23's diagnosis of the simulator's
optimism; BENCHMARKS.md, "Validation against real runs here").

Runs `apam-gossip train` twice, for 1 and for 4 epochs, reads every process's CPU time from
/proc while it runs, and prints the difference per extra update, so that start-up (imports,
data loading) cancels:

    python benchmarks/cpu_per_update.py MODE WORKERS [extra train flags...]
    python benchmarks/cpu_per_update.py centralized 8 --slowdown 1,1,1,1,2,2,2,2 \\
        --network.latency-ms 1 --network.bandwidth-gbps 1

Linux only (/proc). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent


def _cpu_of_tree(root: int) -> dict[int, tuple[float, bool]]:
    """pid -> (CPU seconds so far, is the root) for ``root`` and its descendants."""
    procs: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        procs[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / HZ)
    keep, grown = {root}, True
    while grown:
        grown = False
        for pid, (parent, _) in procs.items():
            if parent in keep and pid not in keep:
                keep.add(pid)
                grown = True
    return {p: (procs[p][1], p == root) for p in keep if p in procs}


def run(mode: str, workers: int, epochs: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        args = [sys.executable, "-m", "apam_gossip", "train", "--mode", mode,
                "--workers", str(workers), "--model", "lenet5", "--dataset", "fashion-mnist",
                "--train-limit", "12000", "--test-limit", "2000", "--epochs", str(epochs),
                "--batch-size", "32", "--threads-per-worker", "1", "--evals", "8",
                "--lr", "1e-3", "-o", str(out), *extra]
        p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        last: dict[int, tuple[float, bool]] = {}
        while p.poll() is None:
            last.update(_cpu_of_tree(p.pid))
            time.sleep(0.05)
        if p.returncode != 0:
            raise SystemExit(f"the run failed (exit {p.returncode}): {' '.join(args)}")
        r = json.loads(out.read_text())
    return {"cpu": sorted(c for c, _ in last.values()),
            "root": sum(c for c, is_root in last.values() if is_root),
            "updates": r["updates"], "wall": r["wall_time"],
            "gradient_ms": [1e3 * w["compute_s"] / max(w["updates"], 1) for w in r["workers"]]}


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    mode, workers, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    a, b = run(mode, workers, 1, extra), run(mode, workers, 4, extra)
    du = b["updates"] - a["updates"]
    per = [round(1e3 * (y - x) / du, 2) for x, y in zip(a["cpu"], b["cpu"], strict=False)]
    print(f"{mode}, {workers} workers {' '.join(extra)}")
    print(f"  CPU per update, all processes: {1e3 * (sum(b['cpu']) - sum(a['cpu'])) / du:.2f} ms;"
          f" wall per update {1e3 * (b['wall'] - a['wall']) / du:.2f} ms")
    print(f"  the coordinator (the launching process): {1e3 * (b['root'] - a['root']) / du:.2f} ms")
    print(f"  each process, sorted by its CPU (pairs the two runs' processes by rank): {per}")
    print(f"  each worker's gradient in the 4-epoch run (ms): "
          f"{[round(g, 2) for g in b['gradient_ms']]}")


if __name__ == "__main__":
    main()
