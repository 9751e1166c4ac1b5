"""The synchronous baselines' steps, with no processes.

* all-reduce: every replica takes the mean message ``[grads | buffers]`` of all workers,
  adopts the mean buffers and applies the optimizer step with the mean gradient, so the
  replicas stay identical (:func:`allreduce_step`);
* D-PSGD: each worker mixes ``[params | buffers]`` (the buffers as its forward pass left
  them) with its neighbors', ``x_i <- sum_j W_ij x_j`` (Metropolis-Hastings weights; the
  arithmetic is :func:`apam_gossip.average.mix_into`, which the transports run), then
  applies its own optimizer step with its own gradient.
"""

from __future__ import annotations

from torch import Tensor

from ..optim import Optimizer, OptState


def allreduce_step(opt: Optimizer, params: Tensor, buffers: Tensor, mean: Tensor,
                   state: OptState, lr: float) -> None:
    """One all-reduce step of a replica from the mean message ``[grads | buffers]``."""
    n = params.numel()
    if buffers.numel():
        buffers.copy_(mean[n:])  # every replica: the mean statistics
    opt.update(params, mean[:n], state, lr=lr)


__all__ = ["allreduce_step"]
