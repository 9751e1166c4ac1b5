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

import gzip
import math
import pickle
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import DATASETS, PARTITIONS  # the names live with the schema
from .errors import DataError, UserError
from .imports import first_line, import_object

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "PARTITION_SCHEMES",
    "BatchStream",
    "Dataset",
    "import_torchvision",
    "load_cifar10",
    "load_dataset",
    "partition",
    "read_cifar10_batches",
    "read_idx",
    "write_idx",
]

PARTITION_SCHEMES: tuple[str, ...] = PARTITIONS
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DATA_DIR = Path("data")  # relative to the working directory (mnist, cifar10)

# Base names of the four IDX files of MNIST and Fashion-MNIST (same names for both).
_IDX_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_APT_HINT = "install them with `apt-get install dataset-fashion-mnist`"


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


# --------------------------------------------------------------------------- torchvision


_TORCHVISION_SHIM: torch.library.Library | None = None  # keeps the shim's schemas alive


def import_torchvision() -> ModuleType | None:
    """Import torchvision (with ``torchvision.datasets``), or return None if impossible.

    The PyPI torchvision wheel built for CUDA fails to import next to a CPU-only torch
    (``RuntimeError: operator torchvision::nms does not exist``): its C++ ops cannot load,
    yet ``torchvision._meta_registrations`` registers fake kernels for ``nms``/``qnms``.  In
    that case the two schemas are defined here (no kernels: calling ``ops.nms`` still fails,
    but datasets/transforms work) and the import is retried.

    Why keep it: the package itself reads every dataset without torchvision (the IDX and
    restricted CIFAR readers). It is kept for what the readers cannot give: a user's
    torchvision model or dataset named by import string (``torchvision.models:resnet18``)
    must import on a machine with the CPU torch, where no CPU build of torchvision can be
    installed from the registries (project machines, CI).
    """
    global _TORCHVISION_SHIM
    try:
        return _import_torchvision_datasets()
    except ImportError:
        return None  # not installed
    except Exception:  # noqa: BLE001 - torchvision raises RuntimeError on a torch mismatch
        if hasattr(torch.ops.torchvision, "nms"):
            return None  # the C++ ops loaded, so the failure is something else
    try:
        if _TORCHVISION_SHIM is None:
            lib = torch.library.Library("torchvision", "FRAGMENT")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _TORCHVISION_SHIM = lib
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]  # drop the half-imported package before retrying
        return _import_torchvision_datasets()
    except Exception:  # noqa: BLE001
        return None


def _import_torchvision_datasets() -> ModuleType:
    import torchvision
    import torchvision.datasets

    if not hasattr(torchvision.datasets, "CIFAR10"):
        raise ImportError("torchvision.datasets.CIFAR10 is missing")
    return torchvision


# --------------------------------------------------------------------------- IDX files


_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":  # gzip magic (an IDX file starts with two zero bytes)
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from None
    return raw


def read_idx(
    path: str | Path, ndim: int | None = None, dtype: np.dtype | None = None
) -> np.ndarray:
    """Read one IDX file (plain or gzipped; gzip is recognized by content, not by name).

    Validates the magic number (two zero bytes, a known type code, the number of
    dimensions; ``ndim``/``dtype`` if given) and that the payload size matches the header
    exactly.  Returns an array in native byte order (read-only for ``uint8``/``int8``).
    Raises DataError naming the file on any problem.
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    magic = int.from_bytes(raw[:4], "big")
    code, nd = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or code not in _IDX_DTYPES or nd == 0:
        raise DataError(f"{path}: not an IDX file (bad magic number 0x{magic:08x})")
    file_dtype = _IDX_DTYPES[code]
    if (ndim is not None and nd != ndim) or (dtype is not None and file_dtype != np.dtype(dtype)):
        want_code = next((c for c, d in _IDX_DTYPES.items() if d == np.dtype(dtype)), code)
        want = (want_code << 8) | (ndim if ndim is not None else nd)
        raise DataError(f"{path}: bad magic number 0x{magic:08x} (expected 0x{want:08x})")
    header = 4 + 4 * nd
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, header needs {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=nd, offset=4))
    expected = header + math.prod(shape) * file_dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "oversized"
        raise DataError(
            f"{path}: {kind} IDX file: {len(raw)} bytes, header {list(shape)} needs {expected}"
        )
    arr = np.frombuffer(raw, dtype=file_dtype, offset=header).reshape(shape)
    if file_dtype.itemsize > 1:
        arr = arr.astype(file_dtype.newbyteorder("="))
    return arr


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzipped if the name ends in ``.gz``); return the path.

    The inverse of :func:`read_idx`; used to build small test fixtures."""
    path = Path(path)
    array = np.asarray(array)
    code = next(
        (
            c
            for c, d in _IDX_DTYPES.items()
            if d.kind == array.dtype.kind and d.itemsize == array.dtype.itemsize
        ),
        None,
    )
    if code is None or array.ndim == 0 or array.ndim > 255:
        raise UserError(f"write_idx: unsupported array dtype {array.dtype} / ndim {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=1)
    path.write_bytes(payload)
    return path


def _find_idx_files(name: str, folder: Path) -> list[Path] | None:
    """The four IDX files in ``folder`` (uncompressed preferred), None if none is there.

    Raises DataError if only some of them are present."""
    found: list[Path | None] = []
    for base in _IDX_FILES:
        plain, gz = folder / base, folder / f"{base}.gz"
        found.append(plain if plain.is_file() else gz if gz.is_file() else None)
    if all(f is None for f in found):
        return None
    missing = [f"{b}[.gz]" for b, f in zip(_IDX_FILES, found, strict=True) if f is None]
    if missing:
        raise DataError(f"{name}: incomplete IDX files in {folder}: missing {', '.join(missing)}")
    return [f for f in found if f is not None]


def _load_idx_dataset(name: str, files: list[Path]) -> Dataset:
    """Build a Dataset from the four (train/test images/labels) MNIST-style IDX files."""
    arrays = []
    for split in (0, 2):
        img_path, lab_path = files[split], files[split + 1]
        images = read_idx(img_path, ndim=3, dtype=np.dtype(np.uint8))
        labels = read_idx(lab_path, ndim=1, dtype=np.dtype(np.uint8))
        if images.shape[1:] != (28, 28):
            raise DataError(f"{img_path}: images are {images.shape[1:]}, expected 28x28")
        if len(images) != len(labels) or len(images) == 0:
            raise DataError(
                f"{img_path.parent}: {img_path.name} holds {len(images)} images but "
                f"{lab_path.name} {len(labels)} labels"
            )
        if labels.max() > 9:
            raise DataError(f"{lab_path}: label {int(labels.max())} out of range 0..9")
        arrays += [images[:, None], labels]
    x_tr, x_te, norm = _normalize(arrays[0], arrays[2], 255.0)
    return Dataset(name, x_tr, _labels(arrays[1]), x_te, _labels(arrays[3]), 10, norm)


def _idx_folder_error(name: str, root: Path, torch_folder: str, note: str = "") -> str:
    files = ", ".join(f"{b}[.gz]" for b in _IDX_FILES)
    return (
        f"{name}: no IDX files in {root / torch_folder / 'raw'}/ nor in {root}/{note} "
        f"(expected {files}); download them with "
        f"torchvision.datasets.{torch_folder}(ROOT, download=True) and pass --data-dir ROOT "
        f"(the torchvision layout ROOT/{torch_folder}/raw/)"
    )


def _load_fashion_mnist(data_dir: Path | None) -> Dataset:
    name = "fashion-mnist"
    if data_dir is not None:
        for folder in (data_dir / "FashionMNIST" / "raw", data_dir):
            files = _find_idx_files(name, folder)
            if files is not None:
                return _load_idx_dataset(name, files)
        err = _idx_folder_error(name, data_dir, "FashionMNIST")
        raise DataError(f"{err}; or {_APT_HINT} and omit --data-dir")
    debian = DEBIAN_FASHION_MNIST  # module global, looked up at call time
    files = _find_idx_files(name, debian)
    if files is None:
        raise DataError(
            f"{name}: no IDX files in {debian} ({_APT_HINT}) and no --data-dir given; "
            f"or pass --data-dir pointing to a torchvision-layout folder ROOT with "
            f"ROOT/FashionMNIST/raw/ ({', '.join(f'{b}[.gz]' for b in _IDX_FILES)})"
        )
    return _load_idx_dataset(name, files)


def _load_mnist(data_dir: Path | None) -> Dataset:
    name = "mnist"
    root = DEFAULT_DATA_DIR if data_dir is None else data_dir
    for folder in (root / "MNIST" / "raw", root):
        files = _find_idx_files(name, folder)
        if files is not None:
            return _load_idx_dataset(name, files)
    note = (
        ""
        if data_dir is not None
        else f" (no --data-dir given, so ./{DEFAULT_DATA_DIR} was searched)"
    )
    raise DataError(_idx_folder_error(name, root, "MNIST", note))


# --------------------------------------------------------------------------- CIFAR-10


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds (a dict of bytes/str, lists, ints and
    numpy arrays): any other class or function named in the file is refused, so a crafted
    batch in a shared data folder cannot run code (plain ``pickle.load`` would)."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch "
                                     "holds only arrays, lists, numbers and strings")


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - unpickling can fail in many ways
        raise DataError(f"{path}: corrupt or unsafe CIFAR-10 batch "
                        f"({type(e).__name__}: {e})") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path}: corrupt CIFAR-10 batch (not a dict)")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or "labels" not in entry:
        raise DataError(f"{path}: corrupt CIFAR-10 batch (no 'data'/'labels' entries)")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{path}: corrupt CIFAR-10 batch ('data' is {data.dtype} {data.shape}, "
            f"expected uint8 [N, 3072])"
        )
    if labels.shape != (len(data),) or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"{path}: corrupt CIFAR-10 batch (labels do not match 'data' or not 0..9)")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar10_batches(
    folder: str | Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read ``data_batch_1..5`` and ``test_batch`` of a ``cifar-10-batches-py`` folder
    with a restricted unpickler that admits only what a CIFAR batch holds (never code).

    Returns ``(x_train, y_train, x_test, y_test)``: uint8 ``[N, 3, 32, 32]`` and int64 ``[N]``.
    """
    folder = Path(folder)
    train = [_cifar_batch(folder / n) for n in _CIFAR_TRAIN]
    x_te, y_te = _cifar_batch(folder / _CIFAR_TEST)
    x_tr = np.concatenate([b[0] for b in train])
    y_tr = np.concatenate([b[1] for b in train])
    return x_tr, y_tr, x_te, y_te


def load_cifar10(data_dir: str | Path | None = None) -> Dataset:
    """CIFAR-10 from ``data_dir/cifar-10-batches-py/`` (or ``data_dir`` being that folder;
    ``./data`` if None), read by :func:`read_cifar10_batches` (not torchvision, whose
    reader unpickles the files with plain pickle)."""
    root = DEFAULT_DATA_DIR if data_dir is None else Path(data_dir)
    folder = root if root.name == _CIFAR_FOLDER else root / _CIFAR_FOLDER
    names = [*_CIFAR_TRAIN, _CIFAR_TEST]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        where = "" if data_dir is not None else f" (no --data-dir given, so ./{root} was searched)"
        raise DataError(
            f"cifar10: missing {', '.join(missing)} in {folder}{where}; extract "
            f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (or run "
            f"torchvision.datasets.CIFAR10(ROOT, download=True)) and pass --data-dir ROOT "
            f"(the torchvision layout ROOT/{_CIFAR_FOLDER}/)"
        )
    x_tr, y_tr, x_te, y_te = read_cifar10_batches(folder)
    if len(x_tr) == 0 or len(x_te) == 0:
        raise DataError(f"cifar10: empty train or test split in {folder}")
    xt, xe, norm = _normalize(x_tr, x_te, 255.0)
    return Dataset("cifar10", xt, _labels(y_tr), xe, _labels(y_te), 10, norm)


# --------------------------------------------------------------------------- digits


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)[:, None]  # [1797, 1, 8, 8], 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=labels
    )
    xt, xe, norm = _normalize(x_tr, x_te, 16.0)
    return Dataset("digits", xt, _labels(y_tr), xe, _labels(y_te), 10, norm)


# --------------------------------------------------------------------------- common


def _normalize(train: np.ndarray, test: np.ndarray,
               scale: float) -> tuple[Tensor, Tensor, Normalization]:
    """float32 ``x / scale``, then ``(x - mean_c) / std_c`` with per-channel train stats."""
    xs = []
    for a in (train, test):
        x = torch.from_numpy(np.asarray(a, dtype=np.float32))  # copies the (read-only) input
        xs.append(x.div_(scale) if x.numel() else x)
    x_tr, x_te = xs
    mean = x_tr.mean(dim=(0, 2, 3))
    std = x_tr.std(dim=(0, 2, 3))  # NaN for a single value per channel
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant channel: only center
    m, s = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    norm = Normalization(scale, tuple(mean.tolist()), tuple(std.tolist()))
    return x_tr.sub_(m).div_(s).contiguous(), x_te.sub_(m).div_(s).contiguous(), norm


def _labels(y: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(y, dtype=np.int64))  # np.array copies: writable


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load one of :data:`DATASETS` (no downloads; see the module docstring).

    * ``digits``: scikit-learn's 8x8 digits (1797 samples, shipped with sklearn), ``/16``,
      stratified 80/20 split with ``random_state=0`` (1437 train / 360 test).  ``data_dir``
      is ignored.
    * ``fashion-mnist``: with ``data_dir``, the IDX files in ``data_dir/FashionMNIST/raw/``
      or directly in ``data_dir``; without, the Debian package files in
      :data:`DEBIAN_FASHION_MNIST` (``apt-get install dataset-fashion-mnist``).
    * ``mnist``: the IDX files in ``data_dir/MNIST/raw/`` or ``data_dir`` (default ``./data``).
    * ``cifar10``: ``data_dir/cifar-10-batches-py/`` (default ``./data``), see
      :func:`load_cifar10`.

    IDX files may be plain or gzipped (``.gz``); plain ones are preferred when both exist.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    root = None if data_dir is None else Path(data_dir).expanduser()
    if root is not None and key != "digits" and not root.is_dir():
        raise DataError(f"{key}: data directory {root} does not exist (or is not a directory)")
    if key == "digits":
        return _load_digits()
    if key == "fashion-mnist":
        return _load_fashion_mnist(root)
    if key == "mnist":
        return _load_mnist(root)
    return load_cifar10(root)


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


# --------------------------------------------------------------------- a user's datasets
class UserData:
    """A user's map-style datasets (anything with ``__getitem__`` and ``__len__``, as
    ``torch.utils.data.Dataset``), read the same way the built-in data is: each worker
    iterates its shard through a ``DataLoader`` (``num_workers``, ``collate_fn``) with a
    seeded shuffle per pass, so a run is reproducible and a 1-worker run sees the batches
    of the sequential run.

    Labels for a Dirichlet split come from the dataset's ``targets`` (the torchvision
    convention) or, failing that, from reading every training sample once."""

    def __init__(self, train: Any, test: Any, name: str = "user data", num_workers: int = 0,
                 collate_fn: Any = None) -> None:
        for split, ds in (("train", train), ("test", test)):
            if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
                raise DataError(f"{name}: the {split} data is a {type(ds).__name__}, not a "
                                "map-style torch.utils.data.Dataset (it needs __getitem__ "
                                "and __len__)")
            if len(ds) == 0:
                raise DataError(f"{name}: the {split} data is empty")
        self.train, self.test, self.name = train, test, name
        self.num_workers, self.collate_fn = num_workers, collate_fn
        self.normalization = None

    def __repr__(self) -> str:
        return f"UserData({self.name!r}, train={len(self.train)}, test={len(self.test)})"

    def train_size(self) -> int:
        return len(self.train)

    def test_size(self) -> int:
        return len(self.test)

    def _loader(self, ds: Any, batch_size: int, **kw: Any) -> Any:
        from torch.utils.data import DataLoader

        kw.setdefault("num_workers", self.num_workers)
        if self.collate_fn is not None:
            kw["collate_fn"] = self.collate_fn
        return DataLoader(ds, batch_size=batch_size, **kw)

    def first_batch(self, n: int = 2) -> tuple[Any, Any]:
        """The first ``n`` training samples as one batch (for checks and shapes)."""
        from torch.utils.data import Subset

        batch = next(iter(self._loader(Subset(self.train, range(min(n, len(self.train)))), n,
                                       num_workers=0)))
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise DataError(f"{self.name}: a batch must be (inputs, targets), got "
                            f"{type(batch).__name__}"
                            + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
        return batch[0], batch[1]

    @property
    def in_shape(self) -> tuple[int, ...]:
        x, _ = self.first_batch(1)
        return tuple(int(d) for d in x.shape[1:])

    @property
    def n_classes(self) -> int:
        labels = self.train_labels()
        if labels.dtype.is_floating_point or labels.dim() != 1:
            raise DataError(f"{self.name}: the targets are not class labels, so a built-in "
                            "classification model does not fit; give your own model")
        return int(labels.max()) + 1

    def train_labels(self) -> Tensor:
        targets = getattr(self.train, "targets", None)
        if targets is not None:
            return torch.as_tensor(targets)
        ys = [self.train[i][1] for i in range(len(self.train))]
        return torch.as_tensor([int(y) if isinstance(y, Tensor) and y.dim() == 0 else y
                                for y in ys])

    def stream(self, shard: Tensor, batch_size: int, seed: int,
               device: torch.device, augment: str = "none") -> LoaderStream:
        check_augment(self, augment)
        return LoaderStream(self, shard, batch_size, seed, device)

    def test_batches(self, batch_size: int, limit: int | None = None,
                     device: torch.device | None = None) -> Iterator[tuple[Any, Any]]:
        from torch.utils.data import Subset

        ds = self.test if limit is None or limit >= len(self.test) \
            else Subset(self.test, range(limit))
        for x, y in self._loader(ds, batch_size, shuffle=False):
            yield (x, y) if device is None else (_to(x, device), _to(y, device))

    def subset(self, n_train: int | None, n_test: int | None) -> UserData:
        from torch.utils.data import Subset

        train = self.train if n_train is None or n_train >= len(self.train) \
            else Subset(self.train, range(n_train))
        test = self.test if n_test is None or n_test >= len(self.test) \
            else Subset(self.test, range(n_test))
        if train is self.train and test is self.test:
            return self
        return UserData(train, test, self.name, self.num_workers, self.collate_fn)

    def share_memory_(self) -> UserData:
        return self  # tensors inside travel to workers in shared memory when pickled

    def __reduce__(self):
        # a dataset class defined in the user's script (__main__) does not exist in a
        # spawned worker: send it by value (cloudpickle); importable ones by reference, so
        # their tensors go through torch's shared-memory pickling as usual
        parts = (self.train, self.test, self.name, self.num_workers, self.collate_fn)
        if any(_from_main(p) for p in parts):
            import cloudpickle

            return _user_data_from_bytes, (cloudpickle.dumps(parts),)
        return UserData, parts


def _from_main(obj: Any) -> bool:
    seen = [obj, getattr(obj, "dataset", None)]  # a Subset wraps the user's dataset
    return any(o is not None and type(o).__module__ == "__main__" for o in seen) or (
        callable(obj) and getattr(obj, "__module__", None) == "__main__")


def _user_data_from_bytes(data: bytes) -> UserData:
    import cloudpickle

    return UserData(*cloudpickle.loads(data))


def _to(v: Any, device: torch.device) -> Any:
    if isinstance(v, Tensor):
        return v.to(device, non_blocking=True)
    if isinstance(v, (list, tuple)):
        return type(v)(_to(x, device) for x in v)
    if isinstance(v, dict):
        return {k: _to(x, device) for k, x in v.items()}
    return v


class LoaderStream:
    """An endless, seeded stream of mini-batches over a shard of a user's dataset: each
    pass is a ``DataLoader`` over the shard shuffled with a generator seeded by (seed,
    pass), dropping the incomplete last batch unless the shard is smaller than a batch."""

    def __init__(self, data: UserData, shard: Tensor, batch_size: int, seed: int,
                 device: torch.device) -> None:
        from torch.utils.data import Subset

        self.data, self.batch_size, self.seed, self.device = data, batch_size, int(seed), device
        self.subset = Subset(data.train, [int(i) for i in shard])
        self.epoch = 0
        self._it = self._pass()

    def _pass(self) -> Iterator[Any]:
        gen = torch.Generator()
        gen.manual_seed(_pass_seed(self.seed, self.epoch))
        return iter(self.data._loader(self.subset, self.batch_size, shuffle=True,
                                      generator=gen,
                                      drop_last=len(self.subset) > self.batch_size))

    def next(self) -> tuple[Any, Any]:
        try:
            x, y = next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = self._pass()
            x, y = next(self._it)
        return _to(x, self.device), _to(y, self.device)


# ------------------------------------------------------------------------- which data
def import_user_object(spec: str, what: str) -> Any:
    """:func:`~apam_gossip.imports.import_object`, with torchvision made importable next
    to the CPU torch first when the string names it."""
    if spec.split(":", 1)[0].split(".")[0] == "torchvision":
        import_torchvision()
    return import_object(spec, what)


def check_augment(data: Dataset | UserData, augment: str) -> None:
    """Refuse, before any process starts, an augmentation the data cannot take."""
    if augment == "none":
        return
    if isinstance(data, UserData):
        raise UserError(f"augment = {augment!r} applies to tensor datasets; {data.name} is a "
                        "map-style dataset: augment in its own transforms, or set augment "
                        "= \"none\"")
    if data.x_train.dim() != 4:
        raise UserError(f"augment = {augment!r} needs images (N, C, H, W); this dataset's "
                        f"samples have shape {tuple(data.x_train.shape[1:])}")


def load_data(cfg: Any, train: Any = None, test: Any = None) -> Dataset | UserData:
    """The data of a run: a user's ``train``/``test`` datasets (the Python API), else
    ``cfg.data.dataset``: a built-in name (:func:`load_dataset`) or an import string
    naming a function that returns ``(train, test)``."""
    d = cfg.data
    collate = import_user_object(d.collate_fn, "collate_fn") if d.collate_fn else None
    if train is not None or test is not None:
        if train is None or test is None:
            raise UserError("give both train_data and test_data (or neither)")
        return UserData(train, test, "train_data/test_data", d.num_workers, collate)
    if d.dataset in DATASETS:
        return load_dataset(d.dataset, d.data_dir)
    fn = import_user_object(d.dataset, "data")
    try:
        out = fn()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a failing user function is a user error
        raise UserError(f"data {d.dataset} raised {type(e).__name__}: {first_line(e)}") \
            from None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise UserError(f"data {d.dataset} returned a {type(out).__name__}, not (train, "
                        "test) datasets")
    return UserData(out[0], out[1], d.dataset, d.num_workers, collate)

