"""A Horovod-style PyTorch script ported to apam_gossip: the lines marked ``# was:`` show
what a Horovod user had; nothing else changed, and nothing changes between modes but
``--mode``.

    apam-gossip launch -np 4 examples/port_horovod.py --mode decentralized
    apam-gossip launch -np 4 examples/port_horovod.py --mode centralized   # rank 0: master
    apam-gossip launch -np 4 examples/port_horovod.py --mode allreduce     # Horovod's own

The shape is Horovod's MNIST example's: a small CNN, SGD with momentum and the lr scaled
by the number of workers, a DistributedSampler per worker, and a test loss and accuracy
averaged over the workers by an all-reduce, printed by one process. Data: Fashion-MNIST
(``--data fashion-mnist``, from the machine's copy, no download) or scikit-learn's 8x8
digits (``--data digits``, the default: seconds on a laptop).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import apam_gossip as ag  # was: import horovod.torch as hvd
from apam_gossip.data import load_dataset


class Net(nn.Module):
    def __init__(self, channels: int, side: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 10, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(20 * (side // 4) ** 2, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="decentralized",
                   choices=["decentralized", "centralized", "allreduce"])
    p.add_argument("--data", default="digits", choices=["digits", "fashion-mnist"])
    p.add_argument("--train-limit", type=int, default=12000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    a = p.parse_args()

    ag.init(mode=a.mode)  # was: hvd.init()
    torch.manual_seed(42)
    d = load_dataset(a.data)
    train = TensorDataset(d.x_train[:a.train_limit], d.y_train[:a.train_limit])
    test = TensorDataset(d.x_test, d.y_test)
    # was: num_replicas=hvd.size(), rank=hvd.rank() -- the workers only, every mode
    sampler = DistributedSampler(train, num_replicas=ag.num_workers(), rank=ag.worker_index())
    loader = DataLoader(train, batch_size=a.batch_size, sampler=sampler)
    test_sampler = DistributedSampler(test, num_replicas=ag.num_workers(),
                                      rank=ag.worker_index(), shuffle=False)
    test_loader = DataLoader(test, batch_size=1000, sampler=test_sampler)

    model = Net(d.x_train.shape[1], d.x_train.shape[2]).to(ag.device())
    optimizer = torch.optim.SGD(model.parameters(), lr=a.lr * ag.num_workers(),
                                momentum=a.momentum)  # was: lr * hvd.size()
    # was: hvd.broadcast_parameters(...) and hvd.broadcast_optimizer_state(...): the
    # wrapper starts every worker from the same model
    optimizer = ag.DistributedOptimizer(optimizer, model)  # was: hvd.DistributedOptimizer(
    #                                   optimizer, named_parameters=model.named_parameters())

    def train_epoch(epoch: int) -> None:
        model.train()
        sampler.set_epoch(epoch)
        for batch, (x, y) in enumerate(loader):
            x, y = x.to(ag.device()), y.to(ag.device())
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            if batch % 100 == 0 and ag.is_main_worker():  # was: hvd.rank() == 0
                print(f"epoch {epoch} [{batch * len(x)}/{len(sampler)}] loss {loss.item():.4f}",
                      flush=True)

    def test_metrics() -> tuple[float, float]:
        model.eval()
        loss = correct = 0.0
        with torch.no_grad():
            for x, y in test_loader:
                x, y = x.to(ag.device()), y.to(ag.device())
                out = model(x)
                loss += F.cross_entropy(out, y, reduction="sum").item()
                correct += (out.argmax(1) == y).sum().item()
        # was: hvd.allreduce(torch.tensor(v), name=...): the mean over the workers
        return (ag.allreduce(loss / len(test_sampler)),
                ag.allreduce(correct / len(test_sampler)))

    for epoch in range(1, a.epochs + 1):
        train_epoch(epoch)
    optimizer.finish(quiet=True)  # new: the mode's end (every rank; the master's model)
    loss, acc = test_metrics()
    if ag.is_main_worker():  # was: hvd.rank() == 0
        print(f"{a.mode}: test loss {loss:.4f}, accuracy {100 * acc:.2f}% "
              f"(averaged over {ag.num_workers()} workers)", flush=True)


if __name__ == "__main__":
    main()
