"""A user's own ``torch.optim.Optimizer`` behind :class:`~apam_gossip.loop.DistributedOptimizer`
(``ag.DistributedOptimizer(torch.optim.Adadelta(model.parameters(), lr=1.0), model)``), as
Horovod and BlueFog wrap the optimizer a script already has.

Each mode takes the user's step where the built-in optimizer's would be, through the same
init/update interface (:class:`~apam_gossip.optim.Optimizer`'s), so every mode's rule is
unchanged (see :mod:`.strategies`):

* one process and **allreduce**: the user's ``step()`` on the model with the (mean)
  gradient; every replica steps alike;
* **decentralized**: the local step after an average is the user's ``step()`` on the
  worker's current model (the gossip state is copied in, stepped, copied back);
* **centralized**: the master builds the same optimizer class with the same param groups
  and hyper-parameters over its own model (:class:`TorchSpec` travels in the ranks'
  agreement) and applies each gradient with it; the workers' optimizers never step.

Learning rates: the param groups' own (a ``torch.optim.lr_scheduler`` on either object
works: the wrapper shares the user's ``param_groups`` and ``state``). Where a rule sets
the step's lr (gossip's ``gossip_lr`` factor, a finished all-reduce rank following the
others, the master's staleness rule on a worker's lr), every group's lr is scaled by the
same ratio to group 0's for that step only. Not available with a wrapped optimizer: the
gossiped second moment (``adaptive_state="tracked"``, AMSGrad's own), lookahead and the
master's staleness-momentum rule (the user's hyper-parameters are applied as given).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import LoopError

OptState = dict[str, Tensor]


@dataclass(frozen=True)
class TorchSpec:
    """What rebuilds a user's optimizer elsewhere: its class, and per param group its
    hyper-parameters (lr included) and the indices of its parameters among the model's
    trained ones (in ``model.parameters()`` order)."""

    cls: type
    groups: tuple[tuple[tuple[tuple[str, Any], ...], tuple[int, ...]], ...]

    @property
    def name(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"

    def lr0(self) -> float:
        return float(dict(self.groups[0][0]).get("lr", 0.0)) if self.groups else 0.0


def spec_of(opt: torch.optim.Optimizer, params: list[Tensor], who: str) -> TorchSpec:
    """The :class:`TorchSpec` of ``opt`` over ``params`` (the model's trained parameters);
    a parameter of the optimizer that is not one of them is an error."""
    index = {id(p): i for i, p in enumerate(params)}
    groups = []
    for g in opt.param_groups:
        idx = []
        for p in g["params"]:
            if not p.requires_grad:  # frozen (fine-tuning): never stepped, not shipped
                continue
            if id(p) not in index:
                raise LoopError(f"{who}: the optimizer holds a parameter of shape "
                                f"{tuple(p.shape)} that is not a trained parameter of the "
                                "model: build it over model.parameters()")
            idx.append(index[id(p)])
        hyper = tuple(sorted((k, _plain(v)) for k, v in g.items() if k != "params"))
        groups.append((hyper, tuple(idx)))
    return TorchSpec(type(opt), tuple(groups))


def _plain(v: Any) -> Any:
    """A hyper-parameter as plain data (a tensor lr becomes its float)."""
    if isinstance(v, Tensor):
        return float(v) if v.numel() == 1 else tuple(v.tolist())
    if isinstance(v, list):
        return tuple(v)
    return v


class _Scaled:
    """Every group's lr times ``lr / lr of group 0`` for one step (nothing when equal)."""

    def __init__(self, opt: torch.optim.Optimizer, lr: float | None) -> None:
        self.opt, self.lr = opt, lr
        self.saved: list[Any] | None = None

    def __enter__(self) -> None:
        groups = self.opt.param_groups
        base = float(groups[0]["lr"])
        if self.lr is None or self.lr == base:
            return
        self.saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = float(g["lr"]) * (self.lr / base) if base > 0 else self.lr

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            for g, lr in zip(self.opt.param_groups, self.saved, strict=True):
                g["lr"] = lr


class TorchStep:
    """The init/update interface over a user's optimizer whose parameters are the views
    ``params``/``grads`` of one flat buffer pair (a worker's model, or the master's).

    ``update(x, g, state, lr)``: ``g`` into the gradient views (unless it is them), ``x``
    into the parameters (unless it is them: gossip's state), the user's ``step()``, and
    back. The state lives in the optimizer (``state`` stays empty)."""

    def __init__(self, opt: torch.optim.Optimizer, params: Tensor, grads: Tensor,
                 hp: Any) -> None:
        self.torch = opt
        self.params, self.grads = params, grads
        self.hp = hp  # the defaults the rules read (lookahead 0, no staleness momentum)

    def lr_at(self, step: int, total: int, staleness: int = 0) -> float:
        raise LoopError("a wrapped optimizer's lr is its param groups' (no schedule "
                        "over a budget)")

    def init(self, params: Tensor) -> OptState:
        return {}

    def update(self, params: Tensor, grad: Tensor, state: OptState,
               lr: float | None = None, tracked: Tensor | None = None) -> None:
        assert tracked is None, "a tracked second moment needs the built-in AMSGrad"
        if grad.data_ptr() != self.grads.data_ptr():
            self.grads.copy_(grad)
        same = params.data_ptr() == self.params.data_ptr()
        if not same:
            self.params.copy_(params)
        with _Scaled(self.torch, lr):
            self.torch.step()
        if not same:
            params.copy_(self.params)


def to_bytes(sd: dict[str, Any]) -> np.ndarray:
    """A torch optimizer's state_dict as bytes (the messages a checkpoint travels in
    carry arrays)."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()


def from_bytes(data: np.ndarray | Tensor) -> dict[str, Any]:
    raw = data.numpy().tobytes() if isinstance(data, Tensor) else data.tobytes()
    return torch.load(io.BytesIO(raw), weights_only=True)


def master_step(spec: TorchSpec, x: Tensor, n_params: int, shapes: list[tuple[int, ...]],
                hp: Any) -> TorchStep:
    """The master's copy of the workers' optimizer (``spec``) over its model ``x``: the
    same class, param groups and hyper-parameters, its parameters views of ``x``."""
    params, grads = x[:n_params], torch.zeros(n_params, dtype=x.dtype, device=x.device)
    views: list[Tensor] = []
    off = 0
    for shape in shapes:
        n = int(np.prod(shape)) if shape else 1
        p = params[off:off + n].view(shape)
        p.grad = grads[off:off + n].view(shape)
        views.append(p)
        off += n
    assert off == n_params, (off, n_params)
    groups = [{**dict(hyper), "params": [views[i] for i in idx]} for hyper, idx in spec.groups]
    try:
        opt = spec.cls(groups)
    except TypeError:  # an optimizer whose lr (or another argument) has no default
        first = {k: v for k, v in groups[0].items() if k != "params"}
        opt = spec.cls(groups, **first)
    return TorchStep(opt, params, grads, hp)


__all__ = ["TorchSpec", "TorchStep", "spec_of", "master_step", "to_bytes", "from_bytes"]
