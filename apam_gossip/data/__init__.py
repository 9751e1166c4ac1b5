"""Datasets, per-worker partitions and infinite mini-batch streams.

Conventions:

* Every dataset is held whole in memory as a :class:`Dataset` of tensors: images are
  ``float32 [N, C, H, W]``, scaled to ``[0, 1]`` and then normalized per channel with the
  mean/std of the *train* split (the same statistics are applied to the test split);
  labels are ``int64 [N]`` in ``0 .. n_classes - 1``.
* Nothing is cached at module level and nothing is downloaded: processes share one loaded
  copy through :meth:`Dataset.share_memory_`.
* Data are looked up only where documented in :func:`load_dataset`; anything missing or
  malformed raises :class:`~apam_gossip.errors.DataError` with a one-line message naming
  the expected files and how to get them.  Bad arguments raise
  :class:`~apam_gossip.errors.UserError`.
* Everything random is seeded: :func:`partition` uses ``numpy.random.default_rng(seed)``,
  :class:`BatchStream` a ``torch.Generator`` reseeded from ``(seed, pass)`` at each pass.
"""

from __future__ import annotations

from ..config import DATASETS  # the names live with the schema
from .builtin import (
    DEBIAN_FASHION_MNIST,
    DEFAULT_DATA_DIR,
    import_torchvision,
    load_cifar10,
    load_dataset,
    read_cifar10_batches,
    read_idx,
    write_idx,
)
from .dataset import Dataset, Normalization
from .streams import PARTITION_SCHEMES, BatchStream, partition
from .user import LoaderStream, UserData, check_augment, import_user_object, load_data

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "DEFAULT_DATA_DIR",
    "PARTITION_SCHEMES",
    "BatchStream",
    "Dataset",
    "LoaderStream",
    "Normalization",
    "UserData",
    "check_augment",
    "import_torchvision",
    "import_user_object",
    "load_cifar10",
    "load_data",
    "load_dataset",
    "partition",
    "read_cifar10_batches",
    "read_idx",
    "write_idx",
]
