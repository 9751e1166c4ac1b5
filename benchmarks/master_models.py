"""Models for benchmarks that must be large while their gradients stay cheap, so that the
APAM master's step over them is what bounds a run (issue 24: `bench master --shards`)."""

from __future__ import annotations

import torch
from torch import nn


class WideBank(nn.Module):
    """A digits classifier (64 -> 10) beside a bank of ``size`` parameters that the
    output touches at 10 entries: 25M parameters by default (100 MB of float32, the
    scale study's 25M model), whose dense gradient costs one pass over the bank, where
    the master's AMSGrad step over it costs about ten."""

    def __init__(self, size: int = 25_000_000) -> None:
        super().__init__()
        self.head = nn.Linear(64, 10)
        self.bank = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1)) + self.bank[:10]


def wide_25m() -> nn.Module:
    return WideBank(25_000_000)


def wide_1m() -> nn.Module:
    return WideBank(1_000_000)
