"""A DDP-style PyTorch script (the shape of pytorch/examples' MNIST: Adadelta at lr 1.0 with
a StepLR scheduler, train() and test() functions) ported to apam_gossip: the lines marked
``# was:`` show what a DistributedDataParallel user had. Adadelta is kept: the wrapper
takes any torch optimizer, at its own lr.

    apam-gossip launch -np 4 examples/port_ddp.py --mode allreduce       # as DDP does
    apam-gossip launch -np 4 examples/port_ddp.py --mode decentralized   # gossip instead
    apam-gossip launch -np 4 examples/port_ddp.py --mode centralized     # APAM
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import apam_gossip as ag  # was: import torch.distributed as dist
from apam_gossip.data import load_dataset


class Net(nn.Module):
    def __init__(self, channels: int, side: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 16, 3, padding=1)
        self.dropout = nn.Dropout(0.25)
        self.fc1 = nn.Linear(16 * (side // 2) ** 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        x = F.relu(self.fc1(self.dropout(torch.flatten(x, 1))))
        return self.fc2(x)


def train(model, loader, optimizer, epoch: int) -> None:
    model.train()
    for x, y in loader:
        x, y = x.to(ag.device()), y.to(ag.device())
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def test(model, loader) -> tuple[float, float]:
    model.eval()
    loss = correct = n = 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(ag.device()), y.to(ag.device())
            out = model(x)
            loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            n += len(y)
    # was: dist.all_reduce(t, op=dist.ReduceOp.SUM) on a tensor of (loss, correct, n)
    loss, correct, n = ag.allreduce(torch.tensor([loss, correct, n]), op="sum").tolist()
    return loss / n, correct / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="allreduce",
                   choices=["decentralized", "centralized", "allreduce"])
    p.add_argument("--data", default="digits", choices=["digits", "fashion-mnist"])
    p.add_argument("--train-limit", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--gamma", type=float, default=0.7)
    p.add_argument("--save-model", default=None, help="one process saves the model here")
    a = p.parse_args()

    ag.init(mode=a.mode)  # was: dist.init_process_group("gloo"); rank = dist.get_rank()
    torch.manual_seed(1)
    d = load_dataset(a.data)
    train_set = TensorDataset(d.x_train[:a.train_limit], d.y_train[:a.train_limit])
    test_set = TensorDataset(d.x_test, d.y_test)
    sampler = DistributedSampler(train_set, num_replicas=ag.num_workers(),  # was: world size
                                 rank=ag.worker_index())  # was: rank
    train_loader = DataLoader(train_set, batch_size=64, sampler=sampler)
    test_loader = DataLoader(test_set, batch_size=1000,
                             sampler=DistributedSampler(test_set, num_replicas=ag.num_workers(),
                                                        rank=ag.worker_index(), shuffle=False))

    model = Net(d.x_train.shape[1], d.x_train.shape[2]).to(ag.device())
    # was: model = DDP(model); optimizer = optim.Adadelta(model.parameters(), lr=args.lr)
    optimizer = ag.DistributedOptimizer(torch.optim.Adadelta(model.parameters(), lr=a.lr),
                                        model)
    scheduler = StepLR(optimizer, step_size=1, gamma=a.gamma)
    for epoch in range(1, a.epochs + 1):
        sampler.set_epoch(epoch)
        train(model, train_loader, optimizer, epoch)
        scheduler.step()
    optimizer.finish(quiet=True)  # new: the mode's end, collective
    loss, acc = test(model, test_loader)
    if ag.is_main_worker():  # was: rank == 0
        print(f"{a.mode}: test loss {loss:.4f}, accuracy {100 * acc:.2f}% "
              f"({ag.num_workers()} workers, Adadelta lr {a.lr:g}, StepLR {a.gamma:g})",
              flush=True)
        if a.save_model:
            torch.save(model.state_dict(), a.save_model)


if __name__ == "__main__":
    main()
