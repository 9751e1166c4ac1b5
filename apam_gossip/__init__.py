"""apam_gossip: asynchronous distributed training.

Two asynchronous modes behind one entry point, :func:`run`:

* ``centralized`` -- APAM: a master applies (possibly stale) worker gradients with AMSGrad
  as they arrive and returns the new model to that worker only;
* ``decentralized`` -- AD-PSGD-style gossip with local adaptive steps;

plus ``sequential``, the one-process reference, and the synchronous baselines
``allreduce``, ``dpsgd`` and ``syncps`` (the APAM paper's synchronous AMSGrad with a
parameter server). Every mode returns a :class:`RunResult`.

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
           "is_main_worker", "num_workers", "worker_index", "device", "allreduce", "broadcast",
           "barrier", "MasterHandle", "LoopSummary", "LoopError"]
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
        allreduce,
        barrier,
        broadcast,
        device,
        init,
        is_main_worker,
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
    hint = _PORTING_HINTS.get(name)
    raise AttributeError(f"module 'apam_gossip' has no attribute {name!r}"
                         + (f": {hint}" if hint else ""))


# what a Horovod, BlueFog or torch.distributed script calls, and what to do here instead
_PORTING_HINTS = {
    "broadcast_parameters": "not needed: every rank starts from the same model (decentralized: "
    "rank 0's; centralized: the master's); delete the call",
    "broadcast_optimizer_state": "not needed: the optimizer state starts fresh on every rank "
    "(use opt.load_state_dict to resume); delete the call",
    "broadcast_object": "use ag.broadcast(obj, root=0)",
    "allreduce_": "use t = ag.allreduce(t) (it returns the result)",
    "allgather": "not available; reduce with ag.allreduce (sum, average, min, max) instead",
    "join": "not needed: opt.finish() lets ranks that took fewer steps finish",
    "local_size": "use ag.num_workers() (training ranks) or ag.size()",
    "get_rank": "use ag.rank(), or ag.is_main_worker() for the rank that prints and saves",
    "get_world_size": "use ag.num_workers() (training ranks) or ag.size()",
    "shutdown": "use opt.finish()",
    # BlueFog's
    "set_topology": "give the topology to ag.init(mode=\"decentralized\", topology=...) "
    "(a generator name such as \"exponential\" or \"ring\", or an edge-list file)",
    "DistributedAdaptWithCombineOptimizer": "use ag.DistributedOptimizer(optimizer, model) "
    "with ag.init(mode=\"decentralized\")",
    "DistributedAdaptThenCombineOptimizer": "use ag.DistributedOptimizer(optimizer, model) "
    "with ag.init(mode=\"decentralized\")",
    "DistributedNeighborAllreduceOptimizer": "use ag.DistributedOptimizer(optimizer, model) "
    "with ag.init(mode=\"decentralized\")",
    "neighbor_allreduce": "not needed: step() averages with a random neighbour of the "
    "topology; for a metric use ag.allreduce",
}
