"""Keep your own training loop: :func:`init`, :class:`DistributedOptimizer`, ``finish()``.

::

    import apam_gossip as ag

    ag.init(mode="decentralized", topology="topologies/ring8.edgelist")  # or "centralized"
    model = MyNet().to(ag.device())
    opt = ag.DistributedOptimizer(model, lr=1e-3)    # AMSGrad by default
    for x, y in loader:                              # your data (shard it by ag.worker_index())
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    opt.finish()

Start it with ``apam-gossip launch -n N script.py`` (or ``mpirun -n N python script.py``);
without a launcher it runs as one process. The modes are one word apart:

* ``centralized`` (APAM): rank 0 is the master, ranks 1..N-1 the workers. On rank 0,
  :func:`init` runs the master: it applies each worker's gradient as it arrives (AMSGrad,
  on the master's model and state) and sends the new model back to that worker, until
  every worker has called ``finish()``; then it broadcasts the final model to the workers,
  writes the result and exits 0 (``master="exit"``), or returns a :class:`MasterHandle`
  (``master="return"``: the script must then skip its loop on rank 0). ``step()`` sends
  ``[gradients | buffers]`` with this worker's learning rate and loads the model that
  comes back. The workers start from the first worker's model (rank 1, or rank K with
  K shards). ``init(master_shards=K)``: ranks
  0..K-1 are the master, each over its slice of the model (see
  :mod:`apam_gossip.loop.master`), the workers ranks K..N-1.
* ``decentralized`` (AD-PSGD style): every rank is a worker; ``step()`` averages the model
  with a random neighbor on the topology (a file, or a generator name such as ``ring``)
  and takes the local adaptive step, exactly as ``--mode decentralized`` (see
  :mod:`apam_gossip.core.gossip`); the models start from rank 0's. As there, the
  average overlaps your gradient: ``step()`` starts the next one in a second thread and
  the next ``step()`` waits for it (``init(overlap=False)``: inside ``step()``).
* ``allreduce`` (the synchronous baseline): ``step()`` averages the gradients (and buffers)
  of every rank still stepping, then every rank takes the same step. A rank that finished
  early joins the remaining all-reduces with nothing and still takes their steps (as
  Horovod's ``join``), so ranks may take different numbers of steps without a hang and
  every replica stays the same.

Learning rate: a number; a callable ``lr(step)`` of the update count (centralized: the
master's count, as the model came back, + 1; else this rank's step + 1); or any
``torch.optim.lr_scheduler`` on the optimizer (it sets ``param_groups[0]["lr"]``, which
every step reads).

Samples are counted by a forward pre-hook: the first dimension of the first tensor the
model is called with in training mode (the per-rank samples/s at ``finish()``).

Errors: under MPI, :func:`init` installs an exception hook: a user error raised on any
rank prints one line (``apam-gossip: error: rank R: ...``) and ends the whole job with exit
code 2 (a check the ranks make together, :func:`init`'s and the model's agreement, is
printed once, by rank 0, naming each rank that failed); any other exception
prints its traceback and ends it with 1. So a failing rank never leaves the others
waiting. Waiting for the others at ``finish()`` has no deadline (a slow worker may train
for hours longer; a rank that dies ends the whole MPI job); ``timeout_s`` bounds each
exchange (an average, the master's reply). A script that ends without ``finish()`` gets
it called at exit, with a warning.

Caveats: build, move and load the model before the optimizer (its parameters are moved
into one flat buffer; in centralized and decentralized mode the model a step works on
comes from the master or the gossip state, so a later ``model.load_state_dict`` is
overwritten; use ``opt.load_state_dict``). ``zero_grad(set_to_none=...)`` zeroes in place.
A scheduler that cycles momentum (``OneCycleLR``, ``CyclicLR``) needs
``cycle_momentum=False``. Centralized ``state_dict()`` travels pickled through the master
(under MPI's 2 GiB message limit: models up to ~150M parameters).

The parts: :mod:`.session` (``init``, the queries, the exception hook), :mod:`.agree` (the
ranks' agreement), :mod:`.optimizer` (the facade) over :mod:`.strategies` (one step
strategy per mode), :mod:`.master` (the centralized master on the APAM core),
:mod:`.report` (the result and summary).
"""

from __future__ import annotations

from .base import MODES, LoopError
from .collectives import allreduce, barrier, broadcast
from .master import MasterHandle
from .optimizer import DistributedOptimizer
from .report import LoopSummary, loop_result, summary_table
from .session import (
    device,
    init,
    is_main_worker,
    is_master,
    local_rank,
    num_workers,
    rank,
    reset,
    size,
    worker_index,
)

_reset = reset  # tests: forget the session

__all__ = ["init", "rank", "size", "local_rank", "is_master", "is_main_worker",
           "num_workers", "worker_index", "device", "allreduce", "broadcast", "barrier",
           "DistributedOptimizer", "MasterHandle", "LoopSummary", "LoopError", "MODES",
           "loop_result", "summary_table"]
