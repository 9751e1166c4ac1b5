"""The in-memory dataset (:class:`Dataset`) and its normalization."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import DataError, UserError
from .streams import BatchStream

# --------------------------------------------------------------------------- Dataset


@dataclass(frozen=True)
class Normalization:
    """How raw images became model inputs: ``x = (raw / scale - mean_c) / std_c`` per
    channel ``c`` (the statistics of the training split). Saved with a model so that it
    can be applied to new images."""

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A whole dataset in memory (see the module docstring for dtypes and normalization)."""

    name: str
    x_train: Tensor  # float32 [N, C, H, W], normalized
    y_train: Tensor  # int64 [N]
    x_test: Tensor  # float32 [M, C, H, W], normalized with the train statistics
    y_test: Tensor  # int64 [M]
    n_classes: int
    normalization: Normalization | None = None

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
                raise DataError(
                    f"{self.name}: inconsistent {split} split: images {tuple(x.shape)}, "
                    f"labels {tuple(y.shape)} (expected [N, C, H, W] and [N])"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{self.name}: train images {tuple(self.x_train.shape[1:])} and test images "
                f"{tuple(self.x_test.shape[1:])} differ in shape"
            )

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def share_memory_(self) -> Dataset:
        """Move all tensors to shared memory (in place, for worker processes); return self."""
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            t.share_memory_()
        return self

    def subset(self, n_train: int | None, n_test: int | None) -> Dataset:
        """The first ``n_train`` train / ``n_test`` test samples (``None`` or more than
        available = all).  Deterministic; the returned tensors are compact copies (not views)
        so that sharing a subset does not share the whole parent storage."""
        x_tr, y_tr = _prefix(self.x_train, self.y_train, n_train, "n_train")
        x_te, y_te = _prefix(self.x_test, self.y_test, n_test, "n_test")
        return Dataset(self.name, x_tr, y_tr, x_te, y_te, self.n_classes, self.normalization)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"in_shape={self.in_shape}, n_classes={self.n_classes})"
        )

    # -- what the runners need of any data (see UserData for a user's datasets) ---------
    def train_size(self) -> int:
        return len(self.y_train)

    def test_size(self) -> int:
        return len(self.y_test)

    def train_labels(self) -> Tensor:
        return self.y_train

    def first_batch(self, n: int = 2) -> tuple[Tensor, Tensor]:
        return self.x_train[:n], self.y_train[:n]

    def stream(self, shard: Tensor, batch_size: int, seed: int,
               device: torch.device, augment: str = "none") -> BatchStream:
        """An endless seeded mini-batch stream over the training samples ``shard``."""
        if device.type == "cpu":
            return BatchStream(self.x_train, self.y_train, shard, batch_size, seed, augment)
        # keep the shard resident on the GPU: no host->device copy per batch
        return BatchStream(self.x_train[shard].to(device), self.y_train[shard].to(device),
                           torch.arange(len(shard)), batch_size, seed, augment)

    def test_batches(self, batch_size: int, limit: int | None = None,
                     device: torch.device | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """The test set (its first ``limit`` samples) in order, in batches."""
        n = len(self.y_test) if limit is None else min(limit, len(self.y_test))
        for i in range(0, n, batch_size):
            j = min(i + batch_size, n)
            x, y = self.x_test[i:j], self.y_test[i:j]
            yield (x, y) if device is None else (x.to(device), y.to(device))


def _prefix(x: Tensor, y: Tensor, n: int | None, what: str) -> tuple[Tensor, Tensor]:
    if n is None:
        return x, y
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"{what} must be an integer >= 1 (or None for all), got {n!r}")
    if n >= len(y):
        return x, y
    return x[:n].clone(), y[:n].clone()
