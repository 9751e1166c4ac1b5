"""A user's own training loop on the loop API, for the tests (run under mpirun, or alone).

Deterministic batches: step k of worker w draws indices from a generator seeded with
(w, k), so a reference in the test process can replay exactly what a worker saw. The
final model state is written (``--out``) by the reporting rank: rank 0, or rank 1 (the
first worker) in centralized mode, which holds the master's final model after finish().
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import apam_gossip as ag


def make_model() -> nn.Module:
    """A bias before BatchNorm would get a zero gradient up to rounding, which AMSGrad
    normalises into full steps: runs that sum in another order would differ there."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, 10))


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def batch(x: torch.Tensor, y: torch.Tensor, worker: int, step: int, size: int = 32):
    g = torch.Generator().manual_seed(1000 * worker + step)
    idx = torch.randint(0, len(y), (size,), generator=g)
    return x[idx], y[idx]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="decentralized")
    p.add_argument("--topology", default=None)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--first-step", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--schedule", choices=["none", "callable", "steplr"], default="none")
    p.add_argument("--out", default=None)
    p.add_argument("--result", default=None)
    p.add_argument("--save-state", default=None)
    p.add_argument("--load-state", default=None)
    p.add_argument("--wide-on-rank", type=int, default=-1, help="a different model there")
    p.add_argument("--short-rank", type=int, default=-1, help="this rank takes half the steps")
    p.add_argument("--model-zero-grad", action="store_true")
    p.add_argument("--step-before-init", action="store_true")
    p.add_argument("--adaptive-state", default="local")
    a = p.parse_args()
    if a.step_before_init:
        ag.DistributedOptimizer(make_model())
    ag.init(mode=a.mode, topology=a.topology, result=a.result,
            adaptive_state=a.adaptive_state)
    model = make_model()
    if ag.rank() == a.wide_on_rank:
        model[0] = nn.Linear(64, 33, bias=False)
    lr = (lambda k: a.lr * 0.99 ** k) if a.schedule == "callable" else a.lr
    opt = ag.DistributedOptimizer(model, lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, 20, 0.5) if a.schedule == "steplr" else None
    if a.load_state:
        opt.load_state_dict(torch.load(a.load_state, weights_only=False))
    x, y = digits()
    w = ag.worker_index()
    steps = a.steps // 2 if ag.rank() == a.short_rank else a.steps
    loss_fn = nn.CrossEntropyLoss()
    for k in range(a.first_step, steps + 1):
        xb, yb = batch(x, y, w, k)
        if a.model_zero_grad:
            model.zero_grad()
        else:
            opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
        if sched is not None:
            sched.step()
        if a.save_state and k == steps:
            sd = opt.state_dict()
            if ag.worker_index() == 0:
                torch.save(sd, a.save_state)
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    reporter = 1 if a.mode == "centralized" and ag.size() > 1 else 0
    me = ag.rank()
    opt.finish(metric=acc)
    if me == reporter and a.out:
        torch.save({"state": torch.cat([t.detach().reshape(-1) for t in
                                        [*model.parameters(), *(b for b in model.buffers()
                                                                 if b.is_floating_point())]]),
                    "acc": acc, "lr": opt.param_groups[0]["lr"]}, a.out)
    print(f"rank {me} done: accuracy {acc:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
