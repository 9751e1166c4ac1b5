"""An ordinary PyTorch training loop made decentralized (AD-PSGD-style gossip) by the
lines marked ``# apam_gossip``.

    apam-gossip launch -n 4 examples/loop_decentralized.py            # 4 ranks on a ring
    apam-gossip launch -n 8 examples/loop_decentralized.py --topology topologies/ring8.edgelist
    python examples/loop_decentralized.py                             # one process

Each rank trains on its shard of scikit-learn's 8x8 digits (real data, no download) with
its own DataLoader, model, loss and learning-rate scheduler; ``step()`` averages its model
with a random neighbor on the topology and takes a local AMSGrad step.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import apam_gossip as ag


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(),
                                  nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def datasets() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = order[:1437], order[1437:]
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te])


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        x, y = (t.to(dev) for t in data.tensors)
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--topology", default=None, help="a topology file (default: a ring)")
    p.add_argument("--result", default=None, help="rank 0 writes the RunResult JSON here")
    a = p.parse_args()

    ag.init(mode="decentralized", topology=a.topology, result=a.result)  # apam_gossip
    train, test = datasets()
    sampler = DistributedSampler(train, num_replicas=ag.num_workers(),  # apam_gossip
                                 rank=ag.worker_index(), seed=0)  # apam_gossip
    # whole batches from the in-memory tensors (one indexing per batch, not 16 items and
    # a collate): the usual idiom for a TensorDataset
    loader = DataLoader(train, sampler=BatchSampler(sampler, 16, drop_last=False),
                        batch_size=None)
    torch.manual_seed(0)
    model = Net().to(ag.device())  # apam_gossip
    opt = ag.DistributedOptimizer(model, lr=2e-3)  # apam_gossip
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=a.epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(a.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            x, y = x.to(ag.device()), y.to(ag.device())
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            sched.step()
    me, own = ag.rank(), accuracy(model, test)
    # every rank's model becomes the average of all; rank 0 scores it for the result
    opt.finish(metric=lambda m: accuracy(m, test), average=True)  # apam_gossip
    print(f"rank {me}: test accuracy {100 * own:.2f}% (its own model), "
          f"{100 * accuracy(model, test):.2f}% (the average)", flush=True)


if __name__ == "__main__":
    main()
