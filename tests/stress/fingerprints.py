"""Fingerprints of the deterministic runs, for refactors that must not change behaviour.

    cd tests && ../.venv/bin/python stress/fingerprints.py OUT.json     # take them
    cd tests && ../.venv/bin/python stress/fingerprints.py OUT.json --against BEFORE.json

Every run here is deterministic: sequential, allreduce and dpsgd on shared memory (lockstep),
a 1-worker centralized run, each with a plain model and with BatchNorm + dropout, and
simulated runs of every mode with several workers (the virtual clock and its seeded gradient
times fix the order of events). A fingerprint is the SHA-256 of the final model's bytes and
the evaluations' metrics; ``--against`` lists every run that differs (exit 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from apam_gossip import run  # noqa: E402
from apam_gossip.data import load_dataset  # noqa: E402
from apam_gossip.sim import simulate  # noqa: E402

from helpers import make_cfg  # noqa: E402

COSTS = {"gradient_s": 1e-3, "master_update_s": 1e-4, "worker_update_s": 1e-4}
BN = "user_models:DigitsBN"


def _fp(r) -> dict:
    return {"params": hashlib.sha256(r.final_params.contiguous().numpy().tobytes()).hexdigest(),
            "metrics": [e.test_metric for e in r.evals], "updates": r.updates,
            "staleness": {str(k): v for k, v in sorted(r.staleness.items())},
            "consensus": [e.extra.get("consensus_distance") for e in r.evals]}


def runs() -> dict[str, dict]:
    digits = load_dataset("digits")
    kw = {"steps": 120, "evals": 3, "threads_per_worker": 1}
    out = {}
    for model in ("mlp", BN):
        tag = "bn" if model == BN else "plain"
        real = [("sequential", {"mode": "sequential"}),
                ("allreduce", {"mode": "allreduce", "workers": 2}),
                ("dpsgd", {"mode": "dpsgd", "workers": 3, "topology": "ring"}),
                ("centralized1", {"mode": "centralized", "workers": 1})]
        for name, cfg in real:
            m = {} if model == "mlp" else {"model": model}
            out[f"real/{name}/{tag}"] = _fp(run(make_cfg(kw, cfg, m), dataset=digits))
        for mode in ("sequential", "centralized", "decentralized", "allreduce", "dpsgd"):
            m = {} if model == "mlp" else {"model": model}
            for n in (1, 4):
                cfg = make_cfg(kw, m, mode=mode, workers=n, topology="ring",
                               slowdown=[1.0] * (n - 1) + [3.0])
                out[f"sim/{mode}{n}/{tag}"] = _fp(simulate(cfg, dataset=digits, **COSTS))
        cfg = make_cfg(kw, {} if model == "mlp" else {"model": model}, mode="centralized",
                       workers=4, optim={"staleness_lr": "sqrt", "lookahead": 1.0})
        out[f"sim/centralized4-lookahead/{tag}"] = _fp(simulate(cfg, dataset=digits, **COSTS))
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--against", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    fps = runs()
    Path(a.out).write_text(json.dumps(fps, indent=1, sort_keys=True))
    if a.against is None:
        print(f"{len(fps)} fingerprints written to {a.out}")
        return 0
    before = json.loads(Path(a.against).read_text())
    differ = [k for k in sorted(set(before) | set(fps)) if before.get(k) != fps.get(k)]
    for k in differ:
        print(f"DIFFERS: {k}")
    print(f"{len(fps) - len(differ)} of {len(fps)} runs identical to {a.against}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
