"""Per-worker partitions (:func:`partition`: iid or Dirichlet) and the seeded, endless
mini-batch streams a worker draws from (:class:`BatchStream`)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from ..config import PARTITIONS  # the names live with the schema
from ..errors import UserError

PARTITION_SCHEMES: tuple[str, ...] = PARTITIONS


# --------------------------------------------------------------------------- partition


def partition(
    labels: Tensor, n_workers: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[Tensor]:
    """Split sample indices ``0 .. len(labels)-1`` among ``n_workers``.

    Returns ``n_workers`` disjoint, sorted int64 index tensors that together cover every
    sample, none of them empty.  ``iid``: a seeded permutation cut into near-equal parts.
    ``dirichlet``: for each class, its samples are dealt out in proportions drawn from
    ``Dirichlet(alpha, ..., alpha)`` (small ``alpha`` = skewed label mixes); a worker left
    empty gets a random sample from the largest worker.
    """
    labels_np = np.asarray(torch.as_tensor(labels).detach().cpu().numpy())
    if labels_np.ndim != 1:
        raise UserError(f"partition: labels must be 1-D, got shape {labels_np.shape}")
    n = len(labels_np)
    if scheme not in PARTITION_SCHEMES:
        raise UserError(
            f"unknown partition scheme {scheme!r}; choose one of {', '.join(PARTITION_SCHEMES)}"
        )
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise UserError(f"n_workers must be an integer >= 1, got {n_workers!r}")
    if n_workers > n:
        raise UserError(f"n_workers={n_workers} exceeds the number of samples ({n})")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise UserError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), n_workers)
    else:
        parts = _dirichlet_parts(labels_np, n_workers, float(alpha), rng)
    return [torch.from_numpy(np.sort(p).astype(np.int64)) for p in parts]


def _dirichlet_parts(
    labels: np.ndarray, n_workers: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    buckets: list[list[np.ndarray]] = [[] for _ in range(n_workers)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        p = rng.dirichlet(np.full(n_workers, alpha))
        if not np.all(np.isfinite(p)) or p.sum() <= 0:  # extreme alpha underflow
            p = np.eye(n_workers)[rng.integers(n_workers)]
        cuts = np.round(np.cumsum(p)[:-1] / p.sum() * len(idx)).astype(np.int64)
        for w, part in enumerate(np.split(idx, cuts)):
            buckets[w].append(part)
    parts = [np.concatenate(b) for b in buckets]
    for w in range(n_workers):  # guarantee non-empty shards (n_workers <= n, so possible)
        if len(parts[w]) == 0:
            donor = int(np.argmax([len(p) for p in parts]))
            k = int(rng.integers(len(parts[donor])))
            parts[w] = parts[donor][k : k + 1]
            parts[donor] = np.delete(parts[donor], k)
    return parts


# --------------------------------------------------------------------------- BatchStream


def _pass_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for pass ``epoch`` of a stream seeded ``seed`` (splitmix64),
    so that streams with nearby seeds do not replay each other's permutations."""
    mask = (1 << 64) - 1
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(epoch) + 1) * 0xD1B54A32D192ED03) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1


class BatchStream:
    """An infinite, deterministic stream of mini-batches ``(x[idx], y[idx])`` over a shard.

    Each pass over ``indices`` uses a fresh permutation from a ``torch.Generator`` seeded
    with a mix of ``(seed, pass number)``.  Every batch has exactly ``batch_size`` samples:
    a pass's leftover tail is completed with the head of the next pass — unless the shard
    is smaller than ``batch_size``, then each batch is the whole (reshuffled) shard.
    ``epoch`` counts completed passes.

    ``augment="hflip"`` mirrors each image of a batch left-right with probability 1/2,
    drawn from a generator of its own (seeded from ``seed``), so the batch order is the
    same with and without augmentation.
    """

    def __init__(self, x: Tensor, y: Tensor, indices: Tensor, batch_size: int, seed: int,
                 augment: str = "none"):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if len(x) != len(y):
            raise UserError(f"BatchStream: x has {len(x)} samples but y has {len(y)}")
        indices = torch.as_tensor(indices).detach().to(torch.int64).flatten().cpu()
        if indices.numel() == 0:
            raise UserError("BatchStream: empty shard (no indices)")
        if int(indices.min()) < 0 or int(indices.max()) >= len(x):
            raise UserError(f"BatchStream: indices out of range 0..{len(x) - 1}")
        if augment not in ("none", "hflip"):
            raise UserError(f"BatchStream: unknown augment {augment!r}; use none or hflip")
        if augment != "none" and x.dim() != 4:
            raise UserError(f"augment {augment} needs images (N, C, H, W), got samples of "
                            f"shape {tuple(x.shape[1:])}")
        self.x, self.y, self.indices = x, y, indices
        self.batch_size = batch_size
        self.seed = int(seed)
        self.augment = augment
        self._aug_gen = torch.Generator().manual_seed(_pass_seed(self.seed, -1))
        self.epoch = 0
        self._gen = torch.Generator()
        self._order = self._permutation()
        self._pos = 0

    def _permutation(self) -> Tensor:
        self._gen.manual_seed(_pass_seed(self.seed, self.epoch))
        return self.indices[torch.randperm(len(self.indices), generator=self._gen)]

    def _finish_pass(self) -> None:
        self.epoch += 1
        self._order = self._permutation()
        self._pos = 0

    def next_indices(self) -> Tensor:
        """The sample indices of the next batch (advances the stream like :meth:`next`)."""
        n, bs = len(self._order), self.batch_size
        if n <= bs:  # small shard: the whole shard, one pass per batch
            idx = self._order
            self._finish_pass()
            return idx
        end = self._pos + bs
        if end < n:
            idx = self._order[self._pos : end]
            self._pos = end
            return idx
        head = self._order[self._pos :]
        self._finish_pass()
        rest = bs - len(head)
        if rest == 0:
            return head
        self._pos = rest
        return torch.cat([head, self._order[:rest]])

    def next(self) -> tuple[Tensor, Tensor]:
        """The next mini-batch ``(x, y)``."""
        idx = self.next_indices()
        x = self.x[idx]
        if self.augment == "hflip":
            flip = torch.rand(len(idx), generator=self._aug_gen) < 0.5
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        return x, self.y[idx]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        return self.next()
