"""apam_gossip: asynchronous distributed training.

Two asynchronous modes behind one entry point, :func:`run`:

* ``centralized`` -- APAM: a master applies (possibly stale) worker gradients with AMSGrad
  as they arrive and returns the new model to that worker only;
* ``decentralized`` -- AD-PSGD-style gossip with local adaptive steps;

plus ``sequential``, the one-process reference. Every mode returns a :class:`RunResult`.

Or keep your own training loop (:mod:`apam_gossip.loop`): ``init()``, then
``DistributedOptimizer(model)`` in place of your optimizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["run", "compare", "RunConfig", "DataConfig", "OptimConfig", "RunResult",
           "Metric", "UserError", "load_model", "__version__",
           # the loop API (apam_gossip.loop)
           "init", "DistributedOptimizer", "rank", "size", "local_rank", "is_master",
           "num_workers", "worker_index", "device", "MasterHandle", "LoopSummary", "LoopError"]
LOOP_NAMES = frozenset(__all__[__all__.index("init"):])

if TYPE_CHECKING:
    from .compare import compare
    from .config import DataConfig, OptimConfig, RunConfig
    from .errors import UserError
    from .loop import (
        DistributedOptimizer,
        LoopError,
        LoopSummary,
        MasterHandle,
        device,
        init,
        is_master,
        local_rank,
        num_workers,
        rank,
        size,
        worker_index,
    )
    from .model_io import load_model
    from .result import RunResult
    from .runner import run
    from .task import Metric


def __getattr__(name: str) -> Any:  # lazy: `import apam_gossip` stays cheap until used
    if name == "run":
        from .runner import run

        return run
    if name in ("RunConfig", "DataConfig", "OptimConfig"):
        from . import config

        return getattr(config, name)
    if name == "RunResult":
        from .result import RunResult

        return RunResult
    if name == "compare":
        from .compare import compare

        return compare
    if name == "Metric":
        from .task import Metric

        return Metric
    if name == "load_model":
        from .model_io import load_model

        return load_model
    if name in LOOP_NAMES:
        from . import loop

        return getattr(loop, name)
    if name == "UserError":
        from .errors import UserError

        return UserError
    raise AttributeError(f"module 'apam_gossip' has no attribute {name!r}")
