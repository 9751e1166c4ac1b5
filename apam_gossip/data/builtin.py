"""The built-in datasets, read from local files only: Fashion-MNIST and MNIST (IDX
files), CIFAR-10 (its pickled batches, read without running code), scikit-learn's digits
(see :func:`load_dataset`)."""

from __future__ import annotations

import gzip
import math
import pickle
import sys
import zlib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import DATASETS  # the names live with the schema
from ..errors import DataError, UserError
from .dataset import Dataset, Normalization

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
