"""The synchronous baselines' steps, with no processes.

* all-reduce: every replica takes the mean message ``[grads | buffers]`` of all workers,
  adopts the mean buffers and applies the optimizer step with the mean gradient, so the
  replicas stay identical (:func:`allreduce_step`);
* D-PSGD: each worker mixes ``[params | buffers]`` (the buffers as its forward pass left
  them) with its neighbors', ``x_i <- sum_j W_ij x_j`` (Metropolis-Hastings weights; the
  arithmetic is :func:`apam_gossip.average.mix_into`, which the transports run), then
  applies its own optimizer step with its own gradient.
* syncps (the synchronous parameter server, the APAM paper's comparator): the global
  batch ``B`` is split over the ``n`` workers (:func:`split_batch`); the master takes the
  sample-weighted mean of the ``n`` messages ``[grads | buffers]``
  (:func:`weighted_mean`) and applies one all-reduce step with it (:func:`syncps_step`):
  with one worker, exactly the sequential run's step.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..config import ConfigError
from ..optim import Optimizer, OptState


def allreduce_step(opt: Optimizer, params: Tensor, buffers: Tensor, mean: Tensor,
                   state: OptState, lr: float) -> None:
    """One all-reduce step of a replica from the mean message ``[grads | buffers]``."""
    n = params.numel()
    if buffers.numel():
        buffers.copy_(mean[n:])  # every replica: the mean statistics
    opt.update(params, mean[:n], state, lr=lr)


def split_batch(batch: int, n_workers: int) -> list[int]:
    """syncps: worker ``i``'s share of the global batch ``batch``: ``batch // n``, one more
    for the first ``batch % n`` workers. Raises :class:`ConfigError` when ``batch`` is
    smaller than the number of workers (a worker would have no sample)."""
    if batch < n_workers:
        raise ConfigError(f"syncps splits the global batch over the workers: batch_size "
                          f"{batch} is smaller than the {n_workers} workers; use "
                          f"--batch-size {n_workers} or more, or fewer workers",
                          "data.batch_size")
    q, r = divmod(batch, n_workers)
    return [q + 1 if i < r else q for i in range(n_workers)]


def weighted_mean(out: Tensor, msgs: Sequence[Tensor], samples: Sequence[int]) -> Tensor:
    """``out`` <- sum_i (s_i / S) msgs[i], S = sum_i s_i, accumulated in the order given
    (so every runtime that passes the same messages gets the same bits; one message is
    copied exactly, its weight being 1). Returns ``out``."""
    total = sum(samples)
    if not msgs or total <= 0:
        raise ValueError("weighted_mean needs at least one message with samples")
    out.copy_(msgs[0])
    if len(msgs) > 1:
        out.mul_(samples[0] / total)
        for m, s in zip(msgs[1:], samples[1:], strict=True):
            out.add_(m, alpha=s / total)
    return out


def syncps_step(opt: Optimizer, x: Tensor, n_params: int, msgs: Sequence[Tensor],
                samples: Sequence[int], state: OptState, lr: float, scratch: Tensor) -> None:
    """One step of the synchronous parameter server on its model ``x`` = ``[params |
    buffers]`` (``n_params`` trained entries): the sample-weighted mean of the workers'
    messages ``[grads | buffers]`` (into ``scratch``, as long as ``x``), then
    :func:`allreduce_step` with it (the mean buffers adopted, one optimizer step)."""
    weighted_mean(scratch, msgs, samples)
    allreduce_step(opt, x[:n_params], x[n_params:], scratch, state, lr)


__all__ = ["allreduce_step", "split_batch", "weighted_mean", "syncps_step"]
