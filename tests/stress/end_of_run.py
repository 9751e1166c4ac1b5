"""Stress the end of a run: one worker 1000x slower is still computing when the budget
is spent (issue 9's reproducer). Runs each mode/transport REPEATS times in a row and
prints the failures; exit 1 if any.

    .venv/bin/python tests/stress/end_of_run.py [REPEATS] [case ...]

cases: centralized-shm centralized-mpi decentralized-shm decentralized-mpi allreduce-shm
allreduce-mpi dpsgd-shm (default: all)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from apam_gossip import RunConfig, run
from apam_gossip.data import load_dataset
from apam_gossip.mpirun import run_mpirun

CASES = ("centralized-shm", "centralized-mpi", "decentralized-shm", "decentralized-mpi",
         "allreduce-shm", "allreduce-mpi", "dpsgd-shm")


def settings(mode: str) -> tuple[int, float]:
    """(steps, slowdown of the last worker): the synchronous modes wait for the slow
    worker every round, so they get fewer steps to keep a run short."""
    return (60, 1000.0) if mode in ("centralized", "decentralized") else (20, 300.0)


def one(case: str, dataset) -> str:
    mode, transport = case.rsplit("-", 1)
    steps, slow = settings(mode)
    if transport == "shm":
        r = run(RunConfig.from_dict({"mode": mode, "workers": 2, "model": "mlp",
                                     "steps": steps, "slowdown": [1, slow], "evals": 2,
                                     "topology": "ring", "data": {"dataset": "digits"}}),
                dataset=dataset)
        return f"updates {r.updates}, per worker {[w.updates for w in r.workers]}"
    ranks = 3 if mode == "centralized" else 2
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        p = run_mpirun(ranks, [sys.executable, "-m", "apam_gossip", "train", "--mode", mode,
                               "--steps", str(steps), "--slow", f"1={slow:g}", "--evals", "2",
                               "--topology", "ring", "-q", "-o", str(out)], timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"exit {p.returncode}: {p.stderr.strip()[-500:]}")
        r = json.loads(out.read_text())
        return f"updates {r['updates']}, per worker {[w['updates'] for w in r['workers']]}"


def main() -> int:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    cases = sys.argv[2:] or list(CASES)
    dataset = load_dataset("digits")
    failed = 0
    for case in cases:
        fails, t = [], time.monotonic()
        for k in range(repeats):
            try:
                one(case, dataset)
            except Exception as e:  # noqa: BLE001 - count and report every failure
                fails.append(f"run {k}: {type(e).__name__}: {e}")
        print(f"{case}: {repeats - len(fails)}/{repeats} ok, {len(fails)} failed "
              f"({time.monotonic() - t:.0f} s)", flush=True)
        for f in fails:
            print("   ", f[:300], flush=True)
        failed += len(fails)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
