"""Saved models: a ``state_dict`` plus what it takes to rebuild the module and feed it.

``apam-gossip train --save-model PATH`` (and :func:`save_model`) writes a file that
``torch.load(PATH, weights_only=True)`` reads without running code from it::

    {"format": "apam_gossip.model/1",
     "model": "lenet5", "model_args": {"in_shape": [1, 28, 28], "n_classes": 10},
     "state_dict": {...},                      # tensors, as nn.Module.state_dict()
     "dataset": "fashion-mnist",
     "normalization": {"scale": 255.0, "mean": [...], "std": [...]}}

:func:`load_model` returns the ready ``nn.Module`` (in eval mode); the normalization says
how raw images become its inputs: ``x = (raw / scale - mean_c) / std_c``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UserError
from .files import atomic_write_bytes
from .flat import flatten
from .models import MODELS, build_model

FORMAT = "apam_gossip.model/1"


def model_from_flat(name: str, in_shape: tuple[int, int, int], n_classes: int,
                    params: Tensor) -> nn.Module:
    """Build model ``name`` and load the flat parameter vector ``params`` into it."""
    model = build_model(name, in_shape, n_classes)
    flat = flatten(model, "cpu")
    if params.numel() != flat.numel:
        raise ValueError(f"{name} has {flat.numel} parameters but the vector has "
                         f"{params.numel()}")
    flat.params.copy_(params.detach().to("cpu", flat.params.dtype))
    for p in model.parameters():  # plain parameters again, not views of the flat buffer
        p.data = p.data.clone()
        p.grad = None
    return model


def save_model(path: str | Path, params: Tensor, *, model: str,
               in_shape: tuple[int, int, int], n_classes: int, dataset: str = "",
               normalization: dict[str, Any] | None = None) -> None:
    """Write the model with flat parameters ``params`` to ``path`` (atomically)."""
    module = model_from_flat(model, in_shape, n_classes, params)
    state = {
        "format": FORMAT, "model": model,
        "model_args": {"in_shape": list(in_shape), "n_classes": int(n_classes)},
        "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "dataset": dataset, "normalization": normalization,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def read_saved_model(path: str | Path) -> dict[str, Any]:
    """The saved dict (see the module docstring), checked; a :class:`UserError` if the
    file is missing, unreadable, unsafe or not a saved model."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"saved model {p} does not exist")
    try:
        d = torch.load(p, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable or unsafe file is a user error
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read saved model {p}: {msg[:200]}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise UserError(f"{p} is not a model saved by apam_gossip ({FORMAT}); "
                        "write one with 'apam-gossip train --save-model PATH'")
    if d.get("model") not in MODELS:
        raise UserError(f"{p}: unknown model {d.get('model')!r}")
    return d


def load_model(path: str | Path) -> nn.Module:
    """The ``nn.Module`` saved at ``path``, weights loaded, in eval mode. Its inputs are
    normalized as ``read_saved_model(path)["normalization"]`` says."""
    d = read_saved_model(path)
    args = d["model_args"]
    model = build_model(d["model"], tuple(args["in_shape"]), int(args["n_classes"]))
    try:
        model.load_state_dict(d["state_dict"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: the weights do not fit a {d['model']} "
                        f"({str(e).splitlines()[0][:200]})") from None
    return model.eval()
