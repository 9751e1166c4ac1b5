"""APAM's first-moment decay and learning rate under staleness, simulated (issue 14).

Asynchrony acts like extra momentum: a gradient stale by tau updates keeps pushing the
model where it was going tau steps ago (Mitliagkas et al., "Asynchrony begets
momentum", 2016). So an asynchronous run with AMSGrad's beta1 = 0.9 has more effective
momentum than the sequential run it is compared with. This scans beta1 and the learning
rate of APAM on the one-slow-worker profile (8 workers, one 10x slower) in the simulator's
math mode (real gradients, the profile's timing), and prints epochs to the target per
seed, next to the sequential run's.

    python benchmarks/apam_momentum_scan.py [SEEDS] [beta1,...] [lr,...] [MODE] [--no-seq]

MODE: centralized (default) or decentralized (gossip's local AMSGrad, same question).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def epochs_to(r, target: float, n_train: int) -> float | None:
    hit = r.first_reaching(target)
    return hit.samples / n_train if hit is not None else None


def main(seeds: int, betas: list[float], lrs: list[float], mode: str = "centralized",
         sequential: bool = True) -> None:
    from apam_gossip.bench import _timed_once
    from apam_gossip.data import load_dataset
    from apam_gossip.profiles import load_profile
    from apam_gossip.sim import simulate

    prof = load_profile(ROOT / "launch" / "profile_one_slow_worker.toml")
    base = prof.config_for(mode)
    data = load_dataset(base.data.dataset, base.data.data_dir)
    n_train = len(data.y_train)
    costs = _timed_once(prof, data, {})  # the model timed once, for every run
    print(f"gradient {1e3 * costs['gradient_s']:.2f} ms, optimizer step "
          f"{1e3 * costs['master_update_s']:.2f} ms (timed here)", flush=True)

    def row(name: str, cfgs) -> None:
        eps, finals = [], []
        for cfg in cfgs:
            r = simulate(cfg, dataset=data, **costs)
            eps.append(epochs_to(r, prof.target, n_train))
            finals.append(r.final_metric)
        got = [e for e in eps if e is not None]
        mean = statistics.fmean(got) if got else float("nan")
        print(f"{name:<28} epochs to {prof.target:g}: "
              + " ".join("-" if e is None else f"{e:.2f}" for e in eps)
              + f"  mean {mean:.2f}  final {statistics.fmean(finals):.2%}", flush=True)

    if sequential:
        seq = prof.config_for("sequential")
        row("sequential", [seq.replace(seed=s) for s in range(seeds)])
    for lr in lrs:
        for b1 in betas:
            row(f"{mode} beta1={b1:g} lr={lr:g}",
                [base.replace(seed=s, optim={"beta1": b1, "lr": lr}) for s in range(seeds)])


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--no-seq"]
    main(int(args[0]) if args else 2,
         [float(b) for b in args[1].split(",")] if len(args) > 1 else [0.9, 0.5, 0.0],
         [float(v) for v in args[2].split(",")] if len(args) > 2 else [1e-3],
         args[3] if len(args) > 3 else "centralized", "--no-seq" not in sys.argv)
