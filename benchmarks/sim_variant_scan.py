"""Epochs to target of one mode's variants, simulated on the one-slow-worker profile
(issue 14): real LeNet5 gradients on the profile's timing, 1.5 epochs, a few seeds.

    python benchmarks/sim_variant_scan.py MODE SEEDS '{"optim": {"warmup": 0.1}}' ...
    python benchmarks/sim_variant_scan.py decentralized 1 '{"workers": 32, "slowdown": []}'

Each JSON argument is a set of RunConfig overrides (nested tables merge key by key); no
argument runs the profile as it is. MODE may be sequential for the reference.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(mode: str, seeds: int, variants: list[dict]) -> None:
    from apam_gossip.bench import _timed_once
    from apam_gossip.data import load_dataset
    from apam_gossip.profiles import load_profile
    from apam_gossip.sim import simulate

    prof = load_profile(ROOT / "launch" / "profile_one_slow_worker.toml")
    base = prof.config_for(mode).replace(epochs=1.5)
    data = load_dataset(base.data.dataset, base.data.data_dir)
    costs = _timed_once(prof, data, {})  # the model timed once, for every run
    n_train = len(data.y_train)
    for extra in variants or [{}]:
        eps, finals = [], []
        for seed in range(seeds):
            r = simulate(base.replace(seed=seed, **extra), dataset=data, **costs)
            hit = r.first_reaching(prof.target)
            eps.append(hit.samples / n_train if hit is not None else float("nan"))
            finals.append(r.final_metric)
        print(f"{mode} {json.dumps(extra)}: epochs to {prof.target:g}: "
              + " ".join(f"{e:.2f}" for e in eps)
              + f"  mean {statistics.fmean(eps):.2f}  final {statistics.fmean(finals):.2%}",
              flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), [json.loads(a) for a in sys.argv[3:]])
