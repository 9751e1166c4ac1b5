"""A user's own models, data, losses and metrics, importable by string from the tests
(``user_models:...``; the tests folder is on sys.path, and so on the workers')."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


class DigitsNet(nn.Module):
    """Not a built-in: 8x8 digits -> 10 classes through one hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10))

    def forward(self, x):
        return self.net(x)


class DigitsBN(nn.Module):
    """With BatchNorm (running statistics: buffers) and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
                                 nn.Dropout(0.1), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


class DigitsBNNoDropout(DigitsBN):
    """DigitsBN without its dropout: buffers, and no randomness in the forward pass (the
    sequential run's dropout draws from another stream than a worker's: its evaluator
    builds a model, which reseeds torch, after the worker seeded its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.net[4] = nn.Identity()


class DigitsFrozen(nn.Module):
    """A frozen random projection (requires_grad=False) under a trained classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Linear(64, 32)
        self.project.requires_grad_(False)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.relu(self.project(x.flatten(1))))


def digits_net() -> nn.Module:
    return DigitsNet()


def complex_net() -> nn.Module:
    m = DigitsNet()
    m.z = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    return m


class SparseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(17, 10, sparse=True)

    def forward(self, x):
        return self.emb((x.flatten(1)[:, 0].abs() * 4).long().clamp(0, 16))


def sparse_net() -> nn.Module:
    return SparseNet()


def broken_factory() -> nn.Module:
    raise ValueError("no such layer size")


def not_a_module():
    return 42


def blobs() -> tuple[Dataset, Dataset]:
    """Two well separated Gaussian blobs in 2-D (a user's TensorDatasets)."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, 2, generator=g) + 3, torch.randn(300, 2, generator=g) - 3])
    y = torch.cat([torch.zeros(300, dtype=torch.long), torch.ones(300, dtype=torch.long)])
    order = torch.randperm(600, generator=g)
    x, y = x[order], y[order]
    return TensorDataset(x[:500], y[:500]), TensorDataset(x[500:], y[500:])


def blob_net() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))


def not_datasets():
    return 1, 2


def one_dataset():
    return blobs()[0]


def vector_loss(output, target):
    return torch.nn.functional.cross_entropy(output, target, reduction="none")


_calls = [0]


def loss_on_the_cpu(output, target):
    """A valid loss that comes back on the CPU whatever the model's device."""
    return nn.functional.cross_entropy(output.cpu(), target.cpu())


def nan_after_60(output, target):
    """Cross-entropy, but NaN from this process's 61st call on (a diverging run)."""
    _calls[0] += 1
    loss = torch.nn.functional.cross_entropy(output, target)
    return loss * float("nan") if _calls[0] > 60 else loss


def error_rate(outputs, targets) -> float:
    """A user metric, lower is better."""
    return float((outputs.argmax(1) != targets).float().mean())


_raise_calls = [0]


def raise_after_10(output, target):
    """Cross-entropy, then an exception at this process's 11th call (a worker crash)."""
    _raise_calls[0] += 1
    if _raise_calls[0] > 10:
        raise RuntimeError(f"boom at call {_raise_calls[0]}")
    return torch.nn.functional.cross_entropy(output, target)


def wide_digits_net() -> nn.Module:
    """About 1.1M parameters (4.4 MB): big enough for the fused pairwise average."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                         nn.ReLU(), nn.Linear(1024, 10))


def dies_in_worker_3() -> nn.Module:
    """DigitsNet, except that the process named "worker 3" SIGKILLs itself while it
    builds the model: a worker that dies during start-up, before its hello (the run's
    own process and the other workers build it as usual)."""
    import multiprocessing
    import os
    import signal

    if multiprocessing.current_process().name == "worker 3":
        os.kill(os.getpid(), signal.SIGKILL)
    return DigitsNet()
