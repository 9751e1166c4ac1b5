"""ag.allreduce / ag.broadcast / ag.barrier and the rank habits in every mode (run under
`apam-gossip launch -n N`): a short loop of uneven length per rank, collectives before
finish() where the mode allows them and after it in every mode, and optionally (--world)
a collective of the user's own on MPI.COMM_WORLD after finish(). Every worker writes what
it saw to OUT/worker<i>.json."""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

import apam_gossip as ag

mode, out = sys.argv[1], sys.argv[2]
world = "--world" in sys.argv
ag.init(mode=mode, timeout_s=60)
torch.manual_seed(0)
model = nn.Linear(4, 2)
opt = ag.DistributedOptimizer(model, lr=1e-2)
i, n = ag.worker_index(), ag.num_workers()
seen: dict = {"rank": ag.rank(), "worker": i, "main": ag.is_main_worker()}
steps = 10 if mode == "allreduce" else 5 + 5 * i  # uneven where the mode allows it
for k in range(steps):
    opt.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    if mode != "allreduce" and k == 2:  # mid-training, while others still train
        seen["mid_sum"] = ag.allreduce(i + 1, op="sum")
if mode == "allreduce":
    seen["mid_sum"] = ag.allreduce(i + 1, op="sum")  # same step count: between steps
summary = opt.finish(quiet=True)
seen["result"] = summary.result.mode if summary.result is not None else None
seen["after"] = {
    "avg": ag.allreduce(float(i)),
    "max": ag.allreduce(i, op="max"),
    "tensor": ag.allreduce(torch.full((3,), float(i))).tolist(),
    "bcast": ag.broadcast({"from": i, "list": [1, 2]}, root=n - 1),
    "bcast_t": ag.broadcast(torch.tensor([i, i]), root=0).tolist(),
    "rank_after": ag.rank(), "main_after": ag.is_main_worker(),
}
ag.barrier()
if world:  # the user's own collective on COMM_WORLD, every rank (the master has exited)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    seen["world"] = comm.allreduce(1)
with open(f"{out}/worker{i}.json", "w") as f:
    json.dump(seen, f)
