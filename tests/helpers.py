"""What the tests share: one config factory (the digits data, small and quick)."""

from __future__ import annotations

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
