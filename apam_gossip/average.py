"""The averaging arithmetic of decentralized training: the pairwise average
``a, b <- (a + b) / 2`` at memory speed (gossip) and a weighted mix (D-PSGD,
:func:`mix_into`).

torch has no single kernel that writes two outputs, so ``lerp`` then ``copy`` reads both
models, writes one, then reads it again and writes the other: five memory streams where
the average needs four (read a and b, write a and b). For models of
:data:`FUSED_MIN_NUMEL` elements or more, :func:`average_pair_` runs one fused loop
compiled by numba (a well-kept JIT on PyPI with wheels for every platform torch has: no
C compiler on the user's machine, no build step). The loop releases the GIL, so an
average run by the communication thread overlaps the training thread's gradient.

Below the threshold the torch pair is used: there the model sits in cache, one average
takes tens of microseconds, and numba's one-off import and compile (about 1 s per
process, measured here) would never pay back. If numba cannot be imported the torch pair
is used for every size (slower, identical result up to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

FUSED_MIN_NUMEL = 1 << 20  # 4 MB of float32: the size where the fused loop starts to pay


@cache
def _fused():
    """The compiled kernel, or None when numba is missing (compiled once per process)."""
    try:
        import numba
        import numpy as np
    except ImportError:  # pragma: no cover - numba is a dependency; kept usable without
        return None

    # no fastmath: a diverged model's NaN and inf must average like any number
    @numba.njit(nogil=True, boundscheck=False, cache=False)
    def average_pair(a, b):  # pragma: no cover - compiled, not traced
        half = np.float32(0.5)
        for k in range(a.shape[0]):
            m = half * (a[k] + b[k])
            a[k] = m
            b[k] = m

    x = np.zeros(2, np.float32)
    average_pair(x, x[::-1].copy())  # compile now (the transport calls this up front)
    return average_pair


def fused_available() -> bool:
    return _fused() is not None


def average_pair_(a: Tensor, b: Tensor, fused: bool | None = None) -> None:
    """Set both ``a`` and ``b`` to their mean, in place (mixing weight 1/2).

    ``fused``: None picks by size (see :data:`FUSED_MIN_NUMEL`); True asks for the fused
    loop where it applies (contiguous float32 CPU tensors, numba importable)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"average_pair_: tensors differ ({tuple(a.shape)} {a.dtype} vs "
                         f"{tuple(b.shape)} {b.dtype})")
    use = a.numel() >= FUSED_MIN_NUMEL if fused is None else fused
    if (use and a.dtype == torch.float32 and a.device.type == "cpu" == b.device.type
            and a.is_contiguous() and b.is_contiguous() and (kernel := _fused()) is not None):
        kernel(a.numpy(), b.numpy())
        return
    if a.device != b.device:  # two GPUs (or a GPU and the host): average on a's
        torch.lerp(a, b.to(a.device), 0.5, out=a)  # device, copy the mean back
    else:
        torch.lerp(a, b, 0.5, out=a)  # a + 0.5 (b - a): one pass
    b.copy_(a)


def mix_into(out: Tensor, weights: list[tuple[int, float]],
             model_of: Callable[[int], Tensor]) -> Tensor:
    """``out`` <- sum_j w_j x_j over the (worker, weight) pairs, in their order (the one
    arithmetic of a D-PSGD mix: the transports and the simulator call it, so a simulated
    D-PSGD is the real one bit for bit); ``out`` must not be one of the x_j."""
    out.zero_()
    for j, w in weights:
        out.add_(model_of(j), alpha=w)
    return out
