"""Saved models: a ``state_dict`` plus what it takes to rebuild the module and feed it.

``apam-gossip train --save-model PATH`` (and :func:`save_model`) writes a file that
``torch.load(PATH, weights_only=True)`` reads without running code from it::

    {"format": "apam_gossip.model/2",
     "model": "lenet5",                         # a built-in name or an import string
     "model_args": {"in_shape": [1, 28, 28], "n_classes": 10},   # built-in models only
     "seed": 0,                                 # the run's seed (frozen parameters)
     "state_dict": {...},                       # tensors, as nn.Module.state_dict()
     "dataset": "fashion-mnist",
     "normalization": {"scale": 255.0, "mean": [...], "std": [...]} or None}

:func:`load_model` returns the ready ``nn.Module`` (in eval mode): a built-in model by
name, a user's model by calling its factory again (its import string must import where
the model is loaded). The normalization says how raw images become the built-in datasets'
inputs: ``x = (raw / scale - mean_c) / std_c``.
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
from .imports import is_import_string
from .models import MODELS, build_model
from .task import Task

FORMAT = "apam_gossip.model/2"
FORMATS = (FORMAT, "apam_gossip.model/1")


def save_model(path: str | Path, state: Tensor, task: Task, *, dataset: str = "",
               normalization: dict[str, Any] | None = None) -> None:
    """Write the model whose state vector ``[params | buffers]`` is ``state`` to ``path``
    (atomically)."""
    module = task.build_model()
    flat = flatten(module, "cpu", who=f"model {task.model_name}")
    if state.numel() != flat.numel:
        raise ValueError(f"model {task.model_name} has a state of {flat.numel} values but "
                         f"the vector has {state.numel()}")
    flat.state.copy_(state.detach().to("cpu", flat.state.dtype))
    builtin = isinstance(task.model, str) and task.model in MODELS
    saved = {
        "format": FORMAT, "model": task.model_name,
        "model_args": {"in_shape": list(task.in_shape or ()), "n_classes": task.n_classes}
        if builtin else {},
        "seed": task.seed,
        "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "dataset": dataset, "normalization": normalization,
    }
    buf = io.BytesIO()
    torch.save(saved, buf)
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
    if not isinstance(d, dict) or d.get("format") not in FORMATS:
        raise UserError(f"{p} is not a model saved by apam_gossip ({FORMAT}); "
                        "write one with 'apam-gossip train --save-model PATH'")
    if d.get("model") not in MODELS and not is_import_string(d.get("model")):
        raise UserError(f"{p}: the model {d.get('model')!r} was given as a Python object, "
                        "not an import string; rebuild it with your code and "
                        "load_state_dict(read_saved_model(path)['state_dict'])")
    return d


def load_model(path: str | Path) -> nn.Module:
    """The ``nn.Module`` saved at ``path``, weights loaded, in eval mode."""
    d = read_saved_model(path)
    args = d.get("model_args") or {}
    if d["model"] in MODELS:
        model = build_model(d["model"], tuple(args["in_shape"]), int(args["n_classes"]))
    else:
        model = Task(d["model"], seed=int(d.get("seed", 0))).build_model()
    try:
        model.load_state_dict(d["state_dict"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: the weights do not fit a {d['model']} "
                        f"({str(e).splitlines()[0][:200]})") from None
    return model.eval()
