"""A sharded APAM master (issue 24) measured three ways, side by side (BENCHMARKS.md):

1. the master's own work, real, here: `bench master --size-mb 95 --shards 1,2` (K processes
   stepping their slices of a 25M-parameter model at once);
2. a master-bound training run, real, here: 2 workers training `WideBank` (25M parameters
   whose gradient is cheap next to the master's step; benchmarks/master_models.py) with
   1 and 2 shards, alternating, ``--rounds`` times;
3. simulated: the scale study's master-bound cluster (launch/study/master_link_25m.toml,
   25M parameters on 10 Gb/s) at 64-1,024 workers, APAM with 1, 4, 16 and 64 shards against
   all-reduce and gossip; timing-only, and in math mode (time to target) at 64 and 128,
   APAM with the plain step and with the staleness-aware one (`staleness_lr = "sqrt"`).

    python benchmarks/sharded_master.py OUT_DIR [--rounds 2] [--skip-real] [--skip-math]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from apam_gossip.data import load_dataset  # noqa: E402
from apam_gossip.profiles import load_profile  # noqa: E402
from apam_gossip.sim.study import scale_study, study_table  # noqa: E402

MODES = {
    "allreduce-amsgrad": ("allreduce-amsgrad", {}),
    "apam": ("centralized", {}),
    "apam-4-shards": ("centralized", {"master_shards": 4}),
    "apam-16-shards": ("centralized", {"master_shards": 16}),
    "apam-64-shards": ("centralized", {"master_shards": 64}),
    "gossip-exponential": ("decentralized", {"topology": "exponential"}),
}
# math mode: APAM with the staleness-aware step, which keeps it training at 64+ workers
# (README, "Which mode for my cluster?"; with the plain step it does not train there at
# any K: sharding changes the speed, not the optimization)
SQRT = {"optim": {"staleness_lr": "sqrt"}}
MATH_MODES = {name: (mode, {**over, **SQRT}) if mode == "centralized" else (mode, over)
              for name, (mode, over) in MODES.items()}


def master_work() -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "apam_gossip", "bench", "master",
                          "--size-mb", "95", "--shards", "1,2"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=900).stdout
    print(out.strip())
    return json.loads(out.strip().splitlines()[-1])


def training(rounds: int) -> list[dict]:
    rows = []
    for r in range(rounds):
        for k in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "r.json"
                subprocess.run([sys.executable, "-m", "apam_gossip", "train", "--mode",
                                "centralized", "--model", "benchmarks.master_models:wide_25m",
                                "--workers", "2", "--master-shards", str(k), "--steps", "60",
                                "--evals", "1", "--eval-samples", "50",
                                "--threads-per-worker", "1", "-q", "-o", str(path)],
                               cwd=ROOT, check=True, timeout=900,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
                d = json.loads(path.read_text())
            rate = d["updates"] / d["wall_time"]
            rows.append({"round": r, "shards": k, "updates_per_s": rate,
                         "wall_time": d["wall_time"]})
            print(f"train, 25M WideBank, 2 workers, {k} shard(s): {rate:.2f} updates/s")
    return rows


def simulated(math: bool, timing: bool = True, plain: bool = True) -> dict:
    """The simulated study: timing-only at 64-1,024 workers; in math mode at 64 and 128,
    APAM with the plain step (``plain``) and with the staleness-aware one."""
    profile = load_profile(ROOT / "launch" / "study" / "master_link_25m.toml")
    data = load_dataset(profile.base.data.dataset, profile.base.data.data_dir)
    costs = dict(profile.sim_costs)
    runs = [("timing", [64, 128, 256, 1024], True, MODES)] if timing else []
    if math:
        runs += [("math", [64, 128], False, MODES)] if plain else []
        runs += [("math_sqrt", [64, 128], False, MATH_MODES)]
    out = {}
    for key, sizes, timing_only, modes in runs:
        rows = scale_study(profile, sizes, data, timing_only, modes, **costs)
        print(f"{key}:")
        print(study_table(rows))
        out[key] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-math", action="store_true")
    ap.add_argument("--only-sqrt", action="store_true", help="only the math-mode runs with "
                    "the staleness-aware step (with --skip-real)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    if not a.skip_real:
        res["master_work"] = master_work()
        res["training"] = training(a.rounds)
    res["simulated"] = simulated(not a.skip_math, timing=not a.only_sqrt,
                                 plain=not a.only_sqrt)
    (out / "sharded_master.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"written: {out / 'sharded_master.json'}")


if __name__ == "__main__":
    main()
