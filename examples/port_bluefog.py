"""A BlueFog-style decentralized PyTorch script ported to apam_gossip: the lines marked
``# was:`` show what a BlueFog user had. BlueFog's neighbour averaging is synchronous (each
step combines with every in-neighbour); here each step averages with one random neighbour
of the topology, asynchronously (AD-PSGD), and the same script runs the other modes too.

    apam-gossip launch -np 4 examples/port_bluefog.py                      # exponential graph
    apam-gossip launch -np 4 examples/port_bluefog.py --topology ring
    apam-gossip launch -np 4 examples/port_bluefog.py --mode allreduce

The shape is BlueFog's MNIST example's: a topology set once, Adam wrapped by the
distributed optimizer, per-worker data shards, and metrics averaged over the workers.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import apam_gossip as ag  # was: import bluefog.torch as bf
from apam_gossip.data import load_dataset


def make_model(channels: int, side: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * (side // 2) ** 2, 64), nn.ReLU(), nn.Linear(64, 10))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="decentralized",
                   choices=["decentralized", "centralized", "allreduce"])
    p.add_argument("--topology", default="exponential",
                   help="a generator name or an edge-list file (decentralized)")
    p.add_argument("--data", default="digits", choices=["digits", "fashion-mnist"])
    p.add_argument("--train-limit", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    a = p.parse_args()

    # was: bf.init(); bf.set_topology(topology_util.ExponentialGraph(bf.size()))
    ag.init(mode=a.mode, topology=a.topology if a.mode == "decentralized" else None)
    torch.manual_seed(0)
    d = load_dataset(a.data)
    train = TensorDataset(d.x_train[:a.train_limit], d.y_train[:a.train_limit])
    sampler = DistributedSampler(train, num_replicas=ag.num_workers(),  # was: bf.size()
                                 rank=ag.worker_index())  # was: bf.rank()
    loader = DataLoader(train, batch_size=32, sampler=sampler)

    model = make_model(d.x_train.shape[1], d.x_train.shape[2]).to(ag.device())
    optimizer = torch.optim.Adam(model.parameters(), lr=a.lr)
    # was: bf.broadcast_parameters(model.state_dict(), root_rank=0)
    # was: optimizer = bf.DistributedAdaptWithCombineOptimizer(optimizer, model=model)
    optimizer = ag.DistributedOptimizer(optimizer, model)

    for epoch in range(a.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            x, y = x.to(ag.device()), y.to(ag.device())
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            x, y = d.x_test.to(ag.device()), d.y_test.to(ag.device())
            return float((model(x).argmax(1) == y).float().mean())

    own = accuracy()  # this worker's own model (gossip: close to the others')
    optimizer.finish(quiet=True)  # new: the mode's end, collective
    mean_own = ag.allreduce(own)  # was: bf.allreduce(torch.tensor(own))
    worst = ag.allreduce(own, op="min")
    if ag.is_main_worker():  # was: bf.rank() == 0
        print(f"{a.mode}: test accuracy {100 * mean_own:.2f}% averaged over "
              f"{ag.num_workers()} workers' own models (worst {100 * worst:.2f}%)",
              flush=True)


if __name__ == "__main__":
    main()
