"""A user's own datasets (:class:`UserData`: any map-style torch Dataset, through a
DataLoader), and which data a run trains on (:func:`load_data`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..config import DATASETS  # the names live with the schema
from ..errors import DataError, UserError
from ..imports import first_line, import_object
from .builtin import import_torchvision, load_dataset
from .dataset import Dataset
from .streams import _pass_seed


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

        loader = self._loader(Subset(self.train, range(min(n, len(self.train)))), n,
                              num_workers=0)
        try:
            batch = next(iter(loader))
        except TypeError as e:  # default_collate: a sample it cannot batch (a PIL image)
            if self.collate_fn is not None or "default_collate" not in str(e):
                raise
            sample = self.train[0]
            kinds = ", ".join(type(v).__name__ for v in sample) \
                if isinstance(sample, (tuple, list)) else type(sample).__name__
            raise DataError(f"{self.name}: samples must be tensors, numpy arrays or numbers "
                            f"to be batched, got ({kinds}); add a transform that makes "
                            "tensors (torchvision.transforms.ToTensor() for PIL images) or "
                            "give a collate_fn") from None
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
