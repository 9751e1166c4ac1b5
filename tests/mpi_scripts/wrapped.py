"""A user's own torch optimizer wrapped (run under `apam-gossip launch -n N`, or alone as
the plain-torch reference with --plain): Adadelta with two param groups (the bias at half
the lr) and a StepLR scheduler, on the same data on every rank, so that the all-reduce
replicas and a 1-worker centralized job follow the plain loop exactly. Every worker writes
its final model and its optimizer's state_dict keys to OUT/worker<i>.pt."""

from __future__ import annotations

import sys

import torch
from torch import nn

import apam_gossip as ag

mode, out = sys.argv[1], sys.argv[2]
plain = "--plain" in sys.argv
STEPS = 12


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.Adadelta([{"params": weights}, {"params": biases, "lr": 0.5}], lr=1.0)
    return model, opt


def batch(k: int):
    g = torch.Generator().manual_seed(100 + k)  # the same batches on every rank
    x = torch.randn(16, 5, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def train(model, opt, sched) -> list[float]:
    losses = []
    for k in range(STEPS):
        x, y = batch(k)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


if plain:
    model, opt = build()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    losses = train(model, opt, sched)
    torch.save({"flat": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                "losses": losses}, f"{out}/plain.pt")
    sys.exit(0)

shards = int(sys.argv[sys.argv.index("--master-shards") + 1]) \
    if "--master-shards" in sys.argv else 1
ag.init(mode=mode, timeout_s=60, master_shards=shards)
model, torch_opt = build()
opt = ag.DistributedOptimizer(torch_opt, model)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)  # on the wrapper
losses = train(model, opt, sched)
sd = opt.state_dict()
i = ag.worker_index()
opt.finish(quiet=True)
torch.save({"flat": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
            "losses": losses, "keys": sorted(k for k in sd if isinstance(k, str)),
            "state_keys": sorted({k for st in sd["state"].values() for k in st}),
            "lrs": [g["lr"] for g in sd["param_groups"]]},
           f"{out}/worker{i}.pt")
