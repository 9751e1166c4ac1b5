"""The consensus distance of decentralized training, defined once.

For models ``x_i = [params | buffers]``, i = 1..n, with mean ``x_bar``:

* ``consensus_distance`` = mean_i |x_i[:p] - x_bar[:p]|^2, over the trained parameters
  (``p = n_params``), the quantity gossip's and D-PSGD's analyses bound;
* ``buffer_consensus`` = the same over the buffers (BatchNorm statistics), reported only
  for a model that has buffers: they are averaged too, but are not trained, and their
  scale is the data's, so the two are kept apart;
* ``consensus_relative`` / ``buffer_consensus_relative``: each divided by |x_bar|^2 over
  the same entries (reported with the buffers, when the scales differ).

:func:`consensus` computes them from the stacked models; :func:`consensus_from_sums`
from all-reduced sums (the loop API, without gathering every model anywhere), as
mean_i |x_i|^2 - |x_bar|^2, which equals the above up to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor


def consensus(xs: Tensor, n_params: int) -> tuple[Tensor, dict[str, float]]:
    """(x_bar, the distances above) of the models ``xs`` ([n, numel])."""
    xbar = xs.mean(0)
    dev = (xs - xbar) ** 2
    params = float(dev[:, :n_params].sum(1).mean())
    buffers = float(dev[:, n_params:].sum(1).mean()) if xs.shape[1] > n_params else None
    return xbar, _named(params, buffers, xbar, n_params)


def consensus_from_sums(total: Tensor, sq_params: float, sq_buffers: float, n: int,
                        n_params: int) -> tuple[Tensor, dict[str, float]]:
    """The same from ``total`` = sum_i x_i (float64) and the sums over i of |x_i|^2
    over the parameters and over the buffers."""
    xbar = total / n
    params = max(0.0, sq_params / n - float((xbar[:n_params] ** 2).sum()))
    buffers = max(0.0, sq_buffers / n - float((xbar[n_params:] ** 2).sum())) \
        if total.numel() > n_params else None
    return xbar, _named(params, buffers, xbar, n_params)


def _named(params: float, buffers: float | None, xbar: Tensor,
           n_params: int) -> dict[str, float]:
    out = {"consensus_distance": params}
    if buffers is not None:
        out["buffer_consensus"] = buffers
        out["consensus_relative"] = params / max(float((xbar[:n_params] ** 2).sum()), 1e-30)
        out["buffer_consensus_relative"] = buffers / max(float((xbar[n_params:] ** 2).sum()),
                                                         1e-30)
    return out


def squares(x: Tensor, n_params: int) -> Tensor:
    """[|x[:p]|^2, |x[p:]|^2] in float64: one rank's part of :func:`consensus_from_sums`."""
    xd = x.double()
    return torch.tensor([float((xd[:n_params] ** 2).sum()), float((xd[n_params:] ** 2).sum())],
                        dtype=torch.float64)


__all__ = ["consensus", "consensus_from_sums", "squares"]
