"""Tests for apam_gossip.data: loaders (real digits / Debian Fashion-MNIST, tiny IDX and
CIFAR fixtures in tmp_path), the IDX reader, partitions and BatchStream."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from apam_gossip import data
from apam_gossip.data import (
    DATASETS,
    BatchStream,
    Dataset,
    load_cifar10,
    load_dataset,
    partition,
    read_cifar10_batches,
    read_idx,
    write_idx,
)
from apam_gossip.errors import DataError, UserError

IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _tiny_mnist(folder: Path, n_train: int = 30, n_test: int = 10, gz: bool = False, seed=0):
    """Write the four IDX files of a tiny MNIST-like dataset; return the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = (
        rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        (np.arange(n_train) % 10).astype(np.uint8),
        rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        (np.arange(n_test) % 10).astype(np.uint8),
    )
    for name, arr in zip(IDX_NAMES, arrays, strict=True):
        write_idx(folder / (name + (".gz" if gz else "")), arr)
    return arrays


def _check_normalized(ds: Dataset, in_shape, n_train, n_test):
    assert ds.in_shape == in_shape
    assert ds.x_train.shape == (n_train, *in_shape) and ds.x_test.shape == (n_test, *in_shape)
    assert ds.x_train.dtype == torch.float32 and ds.x_test.dtype == torch.float32
    assert ds.y_train.dtype == torch.int64 and ds.y_test.dtype == torch.int64
    assert ds.y_train.shape == (n_train,) and ds.y_test.shape == (n_test,)
    per_channel_mean = ds.x_train.mean(dim=(0, 2, 3))
    per_channel_std = ds.x_train.std(dim=(0, 2, 3))
    torch.testing.assert_close(per_channel_mean, torch.zeros(in_shape[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel_std, torch.ones(in_shape[0]), atol=1e-3, rtol=0)
    assert int(ds.y_train.min()) >= 0 and int(ds.y_train.max()) < ds.n_classes


# ----------------------------------------------------------------------------- digits


@pytest.mark.timeout(60)
def test_digits_shapes_normalization_split_and_determinism():
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.n_classes == 10
    _check_normalized(ds, (1, 8, 8), 1437, 360)
    # stratified: every class in both splits, proportions close to the full set's
    counts_tr, counts_te = torch.bincount(ds.y_train), torch.bincount(ds.y_test)
    assert len(counts_tr) == 10 and len(counts_te) == 10
    assert int(counts_te.min()) >= 35 and int(counts_te.max()) <= 37
    # test split normalized with the train statistics: close to, but not exactly, 0/1
    assert abs(float(ds.x_test.mean())) < 0.1
    # train/test are disjoint samples (no image appears in both)
    tr = {tuple(r) for r in ds.x_train.flatten(1).tolist()}
    te = [tuple(r) for r in ds.x_test.flatten(1).tolist()]
    assert sum(r in tr for r in te) < 5  # sklearn digits has a handful of duplicates
    again = load_dataset("digits")
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)
    # the raw scale: pixel value v in 0..16 maps to (v/16 - mean)/std, so at most 17 levels
    assert len(torch.unique(ds.x_train)) <= 17


@pytest.mark.timeout(60)
def test_dataset_subset_share_memory_and_repr():
    ds = load_dataset("digits")
    sub = ds.subset(100, 20)
    assert len(sub.y_train) == 100 and len(sub.y_test) == 20
    assert torch.equal(sub.x_train, ds.x_train[:100]) and torch.equal(sub.y_test, ds.y_test[:20])
    assert sub.x_train.untyped_storage().nbytes() == sub.x_train.nbytes  # compact copy
    assert ds.subset(None, None).x_train is ds.x_train
    assert len(ds.subset(10**6, None).y_train) == len(ds.y_train)  # more than available = all
    with pytest.raises(UserError, match="n_train"):
        ds.subset(0, None)
    with pytest.raises(UserError, match="n_test"):
        ds.subset(None, -3)
    assert sub.share_memory_() is sub
    assert all(t.is_shared() for t in (sub.x_train, sub.y_train, sub.x_test, sub.y_test))
    assert "train=100" in repr(sub) and "tensor" not in repr(sub)


@pytest.mark.timeout(60)
def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError) as e:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(e.value)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- IDX reader


@pytest.mark.timeout(60)
def test_idx_round_trip_plain_and_gzip(tmp_path):
    rng = np.random.default_rng(1)
    cases = [
        rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8),
        rng.integers(-1000, 1000, size=(7,), dtype=np.int32),
        rng.standard_normal((2, 3)).astype(np.float32),
        rng.standard_normal((4,)).astype(np.float64),
        rng.integers(-100, 100, size=(3, 2), dtype=np.int16),
    ]
    for i, arr in enumerate(cases):
        for suffix in ("", ".gz"):
            path = write_idx(tmp_path / f"a{i}{suffix}", arr)
            out = read_idx(path)
            assert out.dtype == arr.dtype and out.shape == arr.shape
            np.testing.assert_array_equal(out, arr)
    # gzip is recognized by content, not by name
    arr = cases[0]
    (tmp_path / "gz_without_suffix").write_bytes(
        gzip.compress(write_idx(tmp_path / "plain", arr).read_bytes())
    )
    np.testing.assert_array_equal(read_idx(tmp_path / "gz_without_suffix"), arr)


@pytest.mark.timeout(60)
def test_idx_reader_matches_hand_written_header(tmp_path):
    """Independent of write_idx: the IDX format as documented (big-endian header)."""
    pixels = bytes(range(2 * 3 * 4))
    raw = struct.pack(">I", 0x00000803) + struct.pack(">III", 2, 3, 4) + pixels
    (tmp_path / "x").write_bytes(raw)
    out = read_idx(tmp_path / "x", ndim=3, dtype=np.dtype(np.uint8))
    assert out.shape == (2, 3, 4) and out[1, 2, 3] == 23 and out[0, 1, 0] == 4
    ints = struct.pack(">I", 0x00000C01) + struct.pack(">I", 2) + struct.pack(">ii", -5, 70000)
    (tmp_path / "i").write_bytes(ints)
    assert read_idx(tmp_path / "i").tolist() == [-5, 70000]


@pytest.mark.timeout(60)
def test_idx_bad_magic_and_truncation_raise_data_error(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((3, 28, 28), np.uint8)).read_bytes()
    (tmp_path / "magic").write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(DataError, match=r"magic.*0x12340803|0x12340803.*magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "code").write_bytes(b"\x00\x00\x07\x03" + good[4:])
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "code")
    # a labels file where images are expected: wrong ndim in the magic number
    labels = write_idx(tmp_path / "labels", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="expected 0x00000803"):
        read_idx(labels, ndim=3, dtype=np.dtype(np.uint8))
    (tmp_path / "trunc").write_bytes(good[:-10])
    with pytest.raises(DataError, match="truncated") as e:
        read_idx(tmp_path / "trunc")
    assert str(tmp_path / "trunc") in str(e.value)
    (tmp_path / "header").write_bytes(good[:9])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "header")
    (tmp_path / "long").write_bytes(good + b"\x00")
    with pytest.raises(DataError, match="oversized"):
        read_idx(tmp_path / "long")
    gz = gzip.compress(good)
    (tmp_path / "trunc.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DataError, match="gzip") as e:
        read_idx(tmp_path / "trunc.gz")
    assert str(tmp_path / "trunc.gz") in str(e.value)
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "absent")


# ----------------------------------------------------------------------------- IDX datasets


@pytest.mark.timeout(60)
@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_torchvision_layout(tmp_path, gz):
    arrays = _tiny_mnist(tmp_path / "FashionMNIST" / "raw", gz=gz)
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.name == "fashion-mnist" and ds.n_classes == 10
    _check_normalized(ds, (1, 28, 28), 30, 10)
    assert ds.y_train.tolist() == arrays[1].tolist() and ds.y_test.tolist() == arrays[3].tolist()
    # normalization is an increasing affine map of the raw pixels, shared by both splits
    raw_tr = torch.from_numpy(arrays[0].astype(np.float32) / 255)
    mean, std = raw_tr.mean(), raw_tr.std()
    torch.testing.assert_close(ds.x_train[:, 0], (raw_tr - mean) / std)
    raw_te = torch.from_numpy(arrays[2].astype(np.float32) / 255)
    torch.testing.assert_close(ds.x_test[:, 0], (raw_te - mean) / std)


@pytest.mark.timeout(60)
def test_fashion_mnist_flat_folder_and_str_path(tmp_path):
    _tiny_mnist(tmp_path, n_train=20, n_test=5, gz=True)
    ds = load_dataset("fashion-mnist", str(tmp_path))
    _check_normalized(ds, (1, 28, 28), 20, 5)


@pytest.mark.timeout(60)
def test_mnist_torchvision_layout_and_default_data_dir(tmp_path, monkeypatch):
    _tiny_mnist(tmp_path / "root" / "MNIST" / "raw", n_train=25, n_test=7)
    ds = load_dataset("mnist", tmp_path / "root")
    assert ds.name == "mnist"
    _check_normalized(ds, (1, 28, 28), 25, 7)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        load_dataset("mnist")  # ./data does not exist yet
    msg = str(e.value)
    assert str(Path("data") / "MNIST" / "raw") in msg and "--data-dir" in msg and "\n" not in msg
    _tiny_mnist(tmp_path / "data" / "MNIST" / "raw", n_train=12, n_test=3, gz=True)
    assert len(load_dataset("mnist").y_train) == 12


@pytest.mark.timeout(60)
def test_idx_dataset_validation_errors(tmp_path):
    root = tmp_path / "MNIST" / "raw"
    _tiny_mnist(root)
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte") as e:
        load_dataset("mnist", tmp_path)
    assert str(root) in str(e.value)
    write_idx(root / "t10k-labels-idx1-ubyte", np.zeros(9, np.uint8))  # 10 images, 9 labels
    with pytest.raises(DataError, match="10 images but t10k-labels-idx1-ubyte 9 labels"):
        load_dataset("mnist", tmp_path)
    write_idx(root / "t10k-labels-idx1-ubyte", np.full(10, 12, np.uint8))
    with pytest.raises(DataError, match="out of range"):
        load_dataset("mnist", tmp_path)
    write_idx(root / "t10k-labels-idx1-ubyte", np.zeros(10, np.uint8))
    write_idx(root / "t10k-images-idx3-ubyte", np.zeros((10, 32, 32), np.uint8))
    with pytest.raises(DataError, match="28x28"):
        load_dataset("mnist", tmp_path)
    good = write_idx(root / "t10k-images-idx3-ubyte", np.zeros((10, 28, 28), np.uint8))
    good.write_bytes(good.read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated") as e:
        load_dataset("mnist", tmp_path)
    assert str(good) in str(e.value)


@pytest.mark.timeout(60)
def test_missing_fashion_mnist_messages(tmp_path, monkeypatch):
    monkeypatch.setattr(data.builtin, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist")
    msg = str(e.value)
    assert str(tmp_path / "no-debian") in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "FashionMNIST/raw/" in msg and "--data-dir" in msg and "\n" not in msg
    # with a data dir: both searched folders named, and no fallback to the Debian files
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in msg and "apt-get install" in msg
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("fashion-mnist", tmp_path / "nowhere")


@pytest.fixture(scope="module")
def debian_fashion() -> Dataset:
    if not all((data.DEBIAN_FASHION_MNIST / f"{n}.gz").is_file() for n in IDX_NAMES):
        pytest.skip(
            f"Debian Fashion-MNIST files absent from {data.DEBIAN_FASHION_MNIST} "
            "(apt-get install dataset-fashion-mnist)"
        )
    return load_dataset("fashion-mnist")


@pytest.mark.timeout(60)
def test_fashion_mnist_debian_files(debian_fashion):
    ds = debian_fashion
    assert ds.name == "fashion-mnist"
    _check_normalized(ds, (1, 28, 28), 60000, 10000)
    assert torch.bincount(ds.y_train, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test, minlength=10).tolist() == [1000] * 10
    assert abs(float(ds.x_test.mean())) < 0.05 and abs(float(ds.x_test.std()) - 1) < 0.05
    assert not torch.equal(ds.x_train[0], ds.x_train[1])


# ----------------------------------------------------------------------------- CIFAR-10


def _tiny_cifar(root: Path, per_batch: int = 4, seed: int = 0):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(per_batch)]
        batches[name] = (x, labels)
        entry = {"batch_label": name, "labels": labels, "data": x, "filenames": ["f"] * per_batch}
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"label_names": [f"c{k}" for k in range(10)], "num_cases_per_batch": per_batch}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return folder, batches


@pytest.mark.timeout(60)
def test_cifar10_fallback_reader(tmp_path):
    folder, batches = _tiny_cifar(tmp_path)
    x_tr, y_tr, x_te, y_te = read_cifar10_batches(folder)
    assert x_tr.shape == (20, 3, 32, 32) and x_tr.dtype == np.uint8 and y_tr.dtype == np.int64
    assert x_te.shape == (4, 3, 32, 32)
    # row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    row = batches["data_batch_2"][0][1]
    assert x_tr[5, 1, 2, 5] == row[1024 + 2 * 32 + 5]
    assert y_tr.tolist()[4:8] == batches["data_batch_2"][1]
    ds = load_cifar10(tmp_path)
    assert ds.name == "cifar10"
    _check_normalized(ds, (3, 32, 32), 20, 4)
    raw = torch.from_numpy(x_tr.astype(np.float32) / 255)
    mean, std = raw.mean(dim=(0, 2, 3)), raw.std(dim=(0, 2, 3))
    torch.testing.assert_close(ds.x_train, (raw - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    # the folder itself can be given
    assert torch.equal(load_cifar10(folder).x_test, ds.x_test)


@pytest.mark.timeout(60)
def test_cifar10_via_load_dataset_without_torchvision(tmp_path, monkeypatch):
    _tiny_cifar(tmp_path)
    monkeypatch.setattr(data.builtin, "import_torchvision", lambda: None)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.y_test.shape == (4,)


@pytest.mark.timeout(60)
def test_cifar10_fallback_reader_rejects_corrupt_batches(tmp_path):
    folder, _ = _tiny_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        read_cifar10_batches(folder)
    (folder / "data_batch_3").write_bytes(
        pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]})
    )
    with pytest.raises(DataError, match=r"data_batch_3.*3072"):
        read_cifar10_batches(folder)


@pytest.mark.timeout(60)
def test_cifar10_missing_files_message(tmp_path, monkeypatch):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "data_batch_1" in msg
    assert "test_batch" in msg and "\n" not in msg
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="no --data-dir given"):
        load_dataset("cifar10")


@pytest.mark.timeout(60)
def test_import_torchvision_shim():
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed")
    tv = data.import_torchvision()
    assert tv is not None, "torchvision is installed but import_torchvision() failed"
    assert tv.datasets.CIFAR10.base_folder == "cifar-10-batches-py"
    assert data.import_torchvision() is tv  # a second call is cheap and consistent


@pytest.mark.timeout(60)
def test_cifar10_reader_agrees_with_torchvision(tmp_path, monkeypatch):
    """Our restricted reader and torchvision's CIFAR10 see the same images and labels."""
    tv = data.import_torchvision()
    if tv is None:
        pytest.skip("torchvision does not import here")
    _tiny_cifar(tmp_path)
    import torchvision.datasets.cifar as tv_cifar

    # the tiny batches fail torchvision's md5 check: accept them by existence only
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    x_tr, y_tr, x_te, y_te = read_cifar10_batches(tmp_path / "cifar-10-batches-py")
    for train, x, y in ((True, x_tr, y_tr), (False, x_te, y_te)):
        ref = tv.datasets.CIFAR10(str(tmp_path), train=train, download=False)
        assert np.array_equal(np.asarray(ref.data).transpose(0, 3, 1, 2), x)
        assert list(ref.targets) == y.tolist()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/apam-gossip-cifar-pwned",))


@pytest.mark.timeout(60)
def test_cifar10_reader_refuses_a_batch_that_would_run_code(tmp_path):
    folder, _ = _tiny_cifar(tmp_path)
    marker = Path("/tmp/apam-gossip-cifar-pwned")
    marker.unlink(missing_ok=True)
    entry = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "x": _Evil()}
    (folder / "data_batch_2").write_bytes(pickle.dumps(entry))
    with pytest.raises(DataError, match=r"data_batch_2.*refusing to load posix\.system"):
        read_cifar10_batches(folder)
    assert not marker.exists()
    # a well-formed batch still loads (numpy arrays pass the restriction)
    (folder / "data_batch_2").write_bytes(pickle.dumps({"data": entry["data"], "labels": [0, 1]}))
    assert read_cifar10_batches(folder)[0].shape == (18, 3, 32, 32)


# ----------------------------------------------------------------------------- partition


def _balanced_labels(per_class: int = 200, n_classes: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return labels[torch.randperm(len(labels), generator=g)]


def _check_partition(parts, n, n_workers):
    assert len(parts) == n_workers
    assert all(p.dtype == torch.int64 and p.dim() == 1 and len(p) > 0 for p in parts)
    cat = torch.cat(parts)
    assert len(cat) == n and torch.equal(torch.sort(cat).values, torch.arange(n))


def _mean_max_class_fraction(labels, parts) -> float:
    fr = [torch.bincount(labels[p], minlength=10).max().item() / len(p) for p in parts]
    return float(np.mean(fr))


@pytest.mark.timeout(60)
def test_partition_iid():
    labels = _balanced_labels()
    parts = partition(labels, 7, "iid", seed=3)
    _check_partition(parts, len(labels), 7)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(torch.equal(a, b) for a, b in zip(parts, partition(labels, 7, seed=3), strict=True))
    assert not torch.equal(parts[0], partition(labels, 7, seed=4)[0])
    _check_partition(partition(labels[:5], 5), 5, 5)  # one sample each
    _check_partition(partition(labels, 1), len(labels), 1)


@pytest.mark.timeout(60)
def test_partition_dirichlet_is_skewed_and_complete():
    labels = _balanced_labels()
    iid = partition(labels, 10, "iid", seed=0)
    skewed = partition(labels, 10, "dirichlet", alpha=0.05, seed=0)
    _check_partition(skewed, len(labels), 10)
    f_iid, f_dir = _mean_max_class_fraction(labels, iid), _mean_max_class_fraction(labels, skewed)
    assert f_iid < 0.25
    assert f_dir > 0.6 and f_dir > 2.5 * f_iid
    mild = partition(labels, 10, "dirichlet", alpha=100.0, seed=0)
    _check_partition(mild, len(labels), 10)
    assert _mean_max_class_fraction(labels, mild) < 0.3
    again = partition(labels, 10, "dirichlet", alpha=0.05, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(skewed, again, strict=True))


@pytest.mark.timeout(60)
def test_partition_dirichlet_never_leaves_a_worker_empty():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    for seed in range(30):
        for n_workers in (2, 5, 8):
            parts = partition(labels, n_workers, "dirichlet", alpha=0.01, seed=seed)
            _check_partition(parts, len(labels), n_workers)


@pytest.mark.timeout(60)
def test_partition_invalid_arguments():
    labels = _balanced_labels(5)
    with pytest.raises(UserError, match="'pathological'"):
        partition(labels, 2, "pathological")
    with pytest.raises(UserError, match="0"):
        partition(labels, 0)
    with pytest.raises(UserError, match="51"):
        partition(labels, 51)
    with pytest.raises(UserError, match="-1"):
        partition(labels, 2, "dirichlet", alpha=-1.0)
    with pytest.raises(UserError, match="alpha"):
        partition(labels, 2, "dirichlet", alpha=0)


# ----------------------------------------------------------------------------- BatchStream


def _coded(n: int):
    """x encodes the sample index, so batches can be traced back to indices."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return x, torch.arange(n) % 10


@pytest.mark.timeout(60)
def test_batch_stream_covers_shard_each_pass_and_wraps():
    x, y = _coded(100)
    shard = torch.tensor([3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37])  # 11 samples
    s = BatchStream(x, y, shard, batch_size=4, seed=0)
    seen = []
    for _ in range(11):  # 44 samples = exactly 4 passes
        xb, yb = s.next()
        assert xb.shape == (4, 1, 2, 2) and yb.shape == (4,)
        ids = xb[:, 0, 0, 0].long()
        assert torch.equal(yb, ids % 10)
        seen += ids.tolist()
    assert s.epoch == 4
    for p in range(4):
        assert sorted(seen[11 * p : 11 * (p + 1)]) == shard.tolist()
    orders = [seen[11 * p : 11 * (p + 1)] for p in range(4)]
    assert len({tuple(o) for o in orders}) > 1  # reshuffled between passes


@pytest.mark.timeout(60)
def test_batch_stream_exact_division_and_epoch_counter():
    x, y = _coded(12)
    s = BatchStream(x, y, torch.arange(12), batch_size=3, seed=1)
    first_pass = [s.next_indices() for _ in range(4)]
    assert s.epoch == 1
    assert sorted(torch.cat(first_pass).tolist()) == list(range(12))
    for _ in range(4):
        s.next()
    assert s.epoch == 2


@pytest.mark.timeout(60)
def test_batch_stream_is_deterministic():
    x, y = _coded(50)
    shard = torch.arange(5, 45)
    a = BatchStream(x, y, shard, 7, seed=42)
    b = BatchStream(x, y, shard, 7, seed=42)
    c = BatchStream(x, y, shard, 7, seed=43)
    batches_a = [next(a) for _ in range(20)]
    batches_b = [xb for xb, _ in zip(b, range(20), strict=False)]  # iterator protocol
    assert all(
        torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
        for p, q in zip(batches_a, batches_b, strict=True)
    )
    batches_c = [c.next()[0] for _ in range(20)]
    assert any(not torch.equal(p[0], q) for p, q in zip(batches_a, batches_c, strict=True))


@pytest.mark.timeout(60)
def test_batch_stream_small_shard_returns_whole_shard():
    x, y = _coded(20)
    shard = torch.tensor([2, 4, 6])
    s = BatchStream(x, y, shard, batch_size=8, seed=0)
    for k in range(3):
        xb, _ = s.next()
        assert sorted(xb[:, 0, 0, 0].long().tolist()) == [2, 4, 6]
        assert s.epoch == k + 1
    s = BatchStream(x, y, shard, batch_size=3, seed=0)  # batch == shard
    assert sorted(s.next_indices().tolist()) == [2, 4, 6] and s.epoch == 1


@pytest.mark.timeout(60)
def test_batch_stream_invalid_arguments():
    x, y = _coded(10)
    with pytest.raises(UserError, match="batch_size"):
        BatchStream(x, y, torch.arange(10), 0, seed=0)
    with pytest.raises(UserError, match="empty"):
        BatchStream(x, y, torch.tensor([], dtype=torch.int64), 2, seed=0)
    with pytest.raises(UserError, match="out of range"):
        BatchStream(x, y, torch.tensor([1, 10]), 2, seed=0)


@pytest.mark.timeout(60)
def test_hflip_mirrors_about_half_the_images_and_keeps_the_batch_order():
    ds = load_dataset("digits")
    plain = BatchStream(ds.x_train, ds.y_train, torch.arange(1000), 50, seed=3)
    aug = BatchStream(ds.x_train, ds.y_train, torch.arange(1000), 50, seed=3, augment="hflip")
    again = BatchStream(ds.x_train, ds.y_train, torch.arange(1000), 50, seed=3,
                        augment="hflip")
    flipped = 0
    for _ in range(40):  # two passes
        (xp, yp), (xa, ya), (xb, _) = plain.next(), aug.next(), again.next()
        assert torch.equal(yp, ya) and torch.equal(xa, xb)  # same order, seeded flips
        same = (xa == xp).flatten(1).all(1)
        mirrored = (xa == xp.flip(-1)).flatten(1).all(1)
        assert bool((same | mirrored).all())  # each image is itself or its mirror
        flipped += int((mirrored & ~same).sum())
    assert 0.4 < flipped / 2000 < 0.6, flipped
    with pytest.raises(UserError, match="needs images"):
        BatchStream(torch.zeros(4, 3), torch.zeros(4), torch.arange(4), 2, 0, "hflip")
    with pytest.raises(UserError, match="unknown augment"):
        BatchStream(ds.x_train, ds.y_train, torch.arange(4), 2, 0, "rotate")


@pytest.mark.timeout(60)
def test_augment_is_refused_for_a_users_map_style_dataset_before_any_process():
    from apam_gossip import RunConfig, run

    train = torch.utils.data.TensorDataset(torch.zeros(8, 1, 8, 8), torch.zeros(8).long())
    cfg = RunConfig.from_dict({"mode": "sequential", "steps": 2, "model": "mlp",
                               "data": {"augment": "hflip"}})
    with pytest.raises(UserError, match="augment in its own transforms"):
        run(cfg, train_data=train, test_data=train)


@pytest.mark.timeout(60)
def test_batch_stream_over_partition_of_real_data():
    ds = load_dataset("digits")
    parts = partition(ds.y_train, 4, "dirichlet", alpha=0.3, seed=0)
    for w, idx in enumerate(parts):
        s = BatchStream(ds.x_train, ds.y_train, idx, batch_size=32, seed=w)
        xb, yb = s.next()
        assert xb.shape == (min(32, len(idx)), 1, 8, 8)
        allowed = set(ds.y_train[idx].tolist())
        assert set(yb.tolist()) <= allowed


class _PilImages(torch.utils.data.Dataset):
    """A torchvision-style dataset without ToTensor(): samples are (PIL image, int)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        from PIL import Image

        return Image.fromarray(np.zeros((8, 8), np.uint8)), i % 2


def test_a_dataset_of_pil_images_is_one_line_naming_to_tensor():
    from apam_gossip.errors import DataError
    from apam_gossip.runner import run

    from helpers import make_cfg

    with pytest.raises(DataError, match=r"got \(Image, int\); add a transform that makes "
                       r"tensors \(torchvision.transforms.ToTensor\(\) for PIL images\)") as e:
        run(make_cfg(mode="sequential", steps=2), train_data=_PilImages(),
            test_data=_PilImages())
    assert "\n" not in str(e.value)
