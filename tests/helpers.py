"""What the tests share: one config factory (the digits data, small and quick)."""

from __future__ import annotations

import os
import signal
from typing import Any

from apam_gossip.config import RunConfig, merge

# every test's starting point; a test file adds its own layer, a test its own keys
BASE: dict[str, Any] = {"model": "mlp", "evals": 2, "topology": "ring",
                        "data": {"dataset": "digits", "batch_size": 16},
                        "optim": {"lr": 1e-2}}


def make_cfg(*layers: dict[str, Any], **kw: Any) -> RunConfig:
    """BASE, then each layer, then ``kw``; nested tables (data, optim, network) are
    merged key by key, so ``optim={"name": "sgd"}`` keeps the layer's lr."""
    d = BASE
    for layer in (*layers, kw):
        d = merge(d, layer)
    return RunConfig.from_dict(d)


def sigterm_at(fraction: float):
    """A run callback that sends this process SIGTERM once, when the run has done more
    than ``fraction`` of its samples (as a scheduler preempting the job would)."""
    sent: list[int] = []

    def callback(ev: Any) -> None:
        if not sent and ev.total_samples and ev.samples > fraction * ev.total_samples:
            os.kill(os.getpid(), signal.SIGTERM)
            sent.append(ev.samples)

    return callback
