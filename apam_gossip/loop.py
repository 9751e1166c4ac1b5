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
  comes back. The workers start from rank 1's model.
* ``decentralized`` (AD-PSGD style): every rank is a worker; ``step()`` averages the model
  with a random neighbour on the topology (a file, or a generator name such as ``ring``)
  and takes the local adaptive step, exactly as ``--mode decentralized`` (see
  :mod:`apam_gossip.algorithms.adpsgd`); the models start from rank 0's. As there, the
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
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import ConfigError, OptimConfig, ignored_settings
from .core.consensus import consensus_from_sums, squares
from .core.sync import allreduce_step
from .errors import UserError
from .flat import FlatModel, flatten
from .messages import (
    Done,
    Grad,
    Hello,
    LoopFault,
    LoopReport,
    LoopState,
    Params,
    StateRequest,
    Stop,
)
from .optim import Optimizer
from .result import EvalRecord, RunResult, WorkerStats

PROG = "apam-gossip"  # the prefix of every line the loop API prints, as the CLI's
MODES = ("centralized", "decentralized", "allreduce")
# OptimConfig fields that shape the lr over a budget: the loop API has no budget (the
# user's loop is the budget) and takes the user's own schedule instead
NOT_LOOP_SETTINGS = ("schedule", "warmup")
INIT_DEFAULTS = {"topology": None, "adaptive_state": "local", "overlap": True,
                 "master": "exit"}
MASTER_CHOICES = ("exit", "return")
ADAPTIVE_STATES = ("local", "tracked")
TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE")


T_METRIC = 41  # centralized: rank 1 -> master, the final model's score


def _score(metric: Callable[[nn.Module], float], model: nn.Module, who: str) -> float:
    value = metric(model)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise LoopError(f"{who}: finish(metric=...) returned {type(value).__name__}, not a "
                        "number") from None


class LoopError(UserError):
    """A loop-API error: one line naming the rank. ``collective``: every rank raises the
    same one (a check they all make alike), so only rank 0 prints it."""

    def __init__(self, message: str, collective: bool = False) -> None:
        super().__init__(message)
        self.collective = collective


@dataclass
class _Session:
    mode: str
    comm: Any | None  # None: one process, no MPI
    rank: int
    size: int
    local_rank: int
    device: torch.device
    topology: str | None
    adaptive_state: str
    seed: int
    timeout_s: float
    result: str | None
    graph: Any = None
    overlap: bool = True
    optimizer: DistributedOptimizer | None = None
    master_done: bool = False  # centralized rank 0, back from init(master="return")

    @property
    def n_workers(self) -> int:
        return self.size - 1 if self.mode == "centralized" and self.comm is not None \
            else self.size

    @property
    def worker_index(self) -> int:
        return self.rank - 1 if self.mode == "centralized" and self.comm is not None \
            else self.rank


_session: _Session | None = None
_hooked = False
_crashed = False  # an uncaught exception is on its way out: no finish() at exit
# waiting for the other ranks to finish has no deadline of its own: they may train for
# hours longer (a slow worker); a rank that dies ends the whole MPI job anyway
NO_DEADLINE_S = 1e9


def _env_rank() -> str:
    for k in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "RANK"):
        if k in os.environ:
            return f"rank {os.environ[k]}"
    return "this process"


def _current(what: str) -> _Session:
    if _session is None:
        _install_hooks()
        raise LoopError(f"{_env_rank()}: {what} before apam_gossip.init(): call "
                        "ag.init(mode=...) first")
    return _session


def _install_hooks() -> None:
    """Once per process: note an uncaught exception (so no ``finish()`` runs at exit for
    a crashed script), and under MPI end the whole job on one (no rank left waiting): a
    user error as one line naming the rank and exit 2, anything else with its traceback
    and exit 1."""
    global _hooked
    if _hooked:
        return
    _hooked = True
    from .transport.mpi import launched_by_mpi

    previous = sys.excepthook
    mpi = launched_by_mpi()

    def hook(tp, e, tb) -> None:
        global _crashed
        _crashed = True
        if not mpi:
            previous(tp, e, tb)
            return
        from .transport.mpi import world

        comm, rank, _ = world()
        if isinstance(e, UserError):
            if getattr(e, "collective", False) and rank != 0:
                time.sleep(2.0)  # every rank has it: rank 0 prints it, once
            else:
                msg = str(e) if str(e).startswith(("rank ", "ranks ", "every rank")) \
                    else f"rank {rank}: {e}"
                for line in msg.splitlines():
                    print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)
            code = 2
        else:
            previous(tp, e, tb)
            code = 1
        sys.stderr.flush()
        comm.Abort(code)

    sys.excepthook = hook


# ----------------------------------------------------------------------- init & queries
def init(mode: str = "decentralized", topology: str | None = None, *,
         adaptive_state: str = "local", seed: int = 0, timeout_s: float = 600.0,
         result: str | None = None, master: str = "exit",
         device: str = "auto", threads: int | None = None,
         overlap: bool = True) -> MasterHandle | None:
    """Join the job as this rank (see the module docstring).

    ``topology``: decentralized only, a topology file or generator (default ``ring``) with
    one node per rank. ``adaptive_state``: decentralized AMSGrad's second moment, ``local``
    or ``tracked``. ``timeout_s``: how long one exchange may take (an average, a reply
    of the master; waiting for the other ranks to finish has no deadline). ``result``:
    where rank 0 writes the RunResult JSON at the end (as ``train`` does; ``compare
    --results`` reads it; checked here, before any training). ``master``: centralized,
    what rank 0 does once the workers are done, ``exit`` (the process exits 0) or
    ``return`` (a :class:`MasterHandle`). ``device``: ``auto`` (a worker's GPU when CUDA
    is present, see :func:`device`; the master never uses one) or ``cpu``. ``threads``:
    torch threads of this rank (default under MPI: a fair share of the host's cores among
    its ranks, as every mode does; without a launcher torch's own default). ``overlap``:
    decentralized, average with the neighbour in a second thread while your loop computes
    the next gradient (as ``train`` does; False: inside ``step()``). A setting that does
    not apply to ``mode`` (``topology`` with ``centralized``, say) is named in one
    ``warning: ignored:`` line and the job goes on, as on the command line, so a script
    switches modes by one word. Returns None except on a returning master.

    Under MPI every rank's checks are agreed before anything collective: an error that
    only some ranks raise (a topology file missing on one host) is printed by rank 0,
    naming each rank that failed, and ends the job with exit code 2.
    """
    global _session
    _install_hooks()
    if _session is not None:
        raise LoopError(f"rank {_session.rank}: apam_gossip.init() was called twice; call "
                        "opt.finish() before starting again")
    from .transport.mpi import launched_by_mpi

    mpi = launched_by_mpi()
    if not mpi and any(k in os.environ for k in TORCHRUN_VARS):
        raise LoopError("apam_gossip's loop API runs under MPI, not torchrun: start the "
                        "script with `apam-gossip launch -n N script.py` (or "
                        "`mpirun -n N python script.py`)")
    comm, rank, size = None, 0, 1
    if mpi:
        from .transport.mpi import world

        comm, rank, size = world()
    values = {"topology": topology, "adaptive_state": adaptive_state, "overlap": overlap,
              "master": master}
    given = {k for k, v in values.items() if v != INIT_DEFAULTS[k]}
    graph = None
    problem: UserError | None = None
    try:  # this rank's own checks: nothing collective before every rank has passed them
        _check_init(mode, master, adaptive_state, device, timeout_s, threads, overlap,
                    result if rank == 0 else None, comm, size)  # rank 0 writes it
        if mode == "decentralized":
            graph = _topology(topology, size, seed)
    except UserError as e:
        problem = e
    _agreed(comm, rank, problem, 600.0 if problem is not None else timeout_s)
    ignored = ignored_settings(given, [mode], OptimConfig())
    if ignored and rank == 0:
        _warn_ignored([f"{k}={values[k]!r} ({why})" for k, why in ignored])
    if any(k == "topology" for k, _ in ignored):
        topology = None
    if not mpi:
        print(f"{PROG}: no MPI launcher: running as one process (start N with "
              "`apam-gossip launch -n N script.py`)", file=sys.stderr, flush=True)
    worker_here, local_rank = 0, 0  # this rank's index among the training ranks on its host
    if comm is not None:
        local_rank, on_node, master_here = _placement(comm, rank)
        worker_here = local_rank - 1 if mode == "centralized" and master_here else local_rank
        if threads is None:
            from .algorithms.common import available_cores

            threads = max(1, available_cores() // on_node)
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device("cpu")
    is_master_rank = mode == "centralized" and comm is not None and rank == 0
    if device == "auto" and torch.cuda.is_available() and not is_master_rank:
        dev = torch.device("cuda", worker_here % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    s = _Session(mode, comm, rank, size, local_rank, dev, topology, adaptive_state, seed,
                 float(timeout_s), result, overlap=overlap)
    s.graph = graph
    _session = s
    if is_master_rank:
        handle = _run_master(s)
        s.master_done = True
        if master == "exit":
            sys.stdout.flush()
            sys.stderr.flush()
            sys.exit(0)
        return handle
    return None


def _check_init(mode: str, master: str, adaptive_state: str, device: str, timeout_s: Any,
                threads: Any, overlap: Any, result: str | None, comm: Any, size: int) -> None:
    """:func:`init`'s own checks of its arguments (no communication)."""
    if mode not in MODES:
        raise LoopError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if master not in MASTER_CHOICES:
        raise LoopError(f"master must be 'exit' or 'return', got {master!r}")
    if adaptive_state not in ADAPTIVE_STATES:
        raise LoopError(f"adaptive_state must be 'local' or 'tracked', got "
                        f"{adaptive_state!r}")
    if device not in ("auto", "cpu"):
        raise LoopError(f"device must be 'auto' or 'cpu', got {device!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) \
            or not 0 < timeout_s <= 1e6:
        raise LoopError(f"timeout_s must be a number of seconds in (0, 1e6], got "
                        f"{timeout_s!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise LoopError(f"threads must be an integer >= 1, got {threads!r}")
    if not isinstance(overlap, bool):
        raise LoopError(f"overlap must be True or False, got {overlap!r}")
    if result is not None:
        if not isinstance(result, str | os.PathLike):
            raise LoopError(f"result must be a file path, got {type(result).__name__}")
        from .files import check_output_path

        try:
            check_output_path(result, "result")
        except UserError as e:
            raise LoopError(str(e)) from None
    if comm is not None:
        if mode == "decentralized":
            from .transport.mpi import require_thread_multiple

            require_thread_multiple("decentralized mode (a server thread serves averages "
                                    "beside your training loop)")
        if mode == "centralized" and size < 2:
            raise LoopError("centralized mode needs a master and at least one worker: "
                            "launch 2 or more ranks (or run without a launcher for one "
                            "process)")


def _topology(spec: str | None, size: int, seed: int) -> Any:
    from .topology import make_topology, validate_topology

    spec = spec if spec is not None else "ring"
    try:
        return validate_topology(make_topology(spec, size, seed), size)
    except UserError as e:
        raise LoopError(f"topology {spec}: {e} (the job has {size} rank"
                        f"{'s' if size != 1 else ''})") from None


def _agreed(comm: Any, rank: int, problem: UserError | None, timeout_s: float) -> None:
    """Raise ``problem`` (one process), or under MPI every rank's problems on every rank:
    the same :class:`LoopError`, printed by rank 0, which names each rank that failed
    (``every rank`` when all failed alike); so an error of a few ranks is never lost in
    an MPI_Abort that another rank's print did not survive. A rank that never calls
    init() (it failed before, or took another branch) is an error after ``timeout_s``,
    not a hang."""
    if comm is None:
        if problem is not None:
            raise problem
        return
    req = comm.Ibarrier()  # every rank is here: then the allgather cannot block
    deadline = time.monotonic() + float(timeout_s)
    while not req.Test():
        if time.monotonic() > deadline:
            raise LoopError(f"rank {rank}: not every rank called apam_gossip.init() within "
                            f"timeout_s={float(timeout_s):g} s; each rank of the job must "
                            "call it (a rank that failed before it ends the job)")
        time.sleep(0.005)
    said = comm.allgather(None if problem is None else _without_rank(str(problem)))
    failed: dict[str, list[int]] = {}
    for r, msg in enumerate(said):
        if msg is not None:
            failed.setdefault(msg, []).append(r)
    if not failed:
        return
    lines = []
    for msg, ranks in failed.items():
        who = "every rank" if len(ranks) == len(said) and len(said) > 1 else \
            f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {_ranges(ranks)}"
        lines.append(f"{who}: {msg}")
    raise LoopError("\n".join(lines), collective=True)


def _without_rank(message: str) -> str:
    """A message without its leading ``rank R: `` (the agreement names the ranks)."""
    import re

    return re.sub(r"^rank \d+: ", "", message)


def _ranges(ranks: list[int]) -> str:
    """``0-3, 5`` for [0, 1, 2, 3, 5]."""
    out, start = [], ranks[0]
    for a, b in zip(ranks, [*ranks[1:], None], strict=True):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


def _warn_ignored(items: list[str]) -> None:
    print(f"{PROG}: warning: ignored: {'; '.join(items)}", file=sys.stderr, flush=True)


def _placement(comm: Any, rank: int) -> tuple[int, int, bool]:
    """(index among the host's ranks, ranks on the host, whether rank 0 is on it)."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        ranks = node.allgather(rank)
        return node.Get_rank(), node.Get_size(), 0 in ranks
    finally:
        node.Free()


def rank() -> int:
    """This process's rank (0 without a launcher)."""
    return _current("ag.rank()").rank


def size() -> int:
    """The number of ranks (1 without a launcher)."""
    return _current("ag.size()").size


def local_rank() -> int:
    """This rank's index among the ranks on its host."""
    return _current("ag.local_rank()").local_rank


def is_master() -> bool:
    """True on the master rank of a centralized job (rank 0; it never trains)."""
    s = _current("ag.is_master()")
    return s.mode == "centralized" and s.comm is not None and s.rank == 0


def num_workers() -> int:
    """How many ranks train (centralized: all but the master)."""
    return _current("ag.num_workers()").n_workers


def worker_index() -> int:
    """This rank's index among the training ranks, 0..num_workers()-1: shard your data
    by it (``DistributedSampler(ds, num_workers(), worker_index())``)."""
    return _current("ag.worker_index()").worker_index


def device() -> torch.device:
    """This rank's device: with CUDA present (and ``init(device="auto")``), a worker's
    ``cuda:(i mod n_gpus)``, ``i`` its index among the training ranks on its host (the
    centralized master, rank 0, is not one: it stays on the CPU); else the CPU."""
    return _current("ag.device()").device


# ------------------------------------------------------------------ model signatures
@dataclass(frozen=True)
class _Signature:
    """What must agree across ranks: every trained parameter's and float buffer's name,
    shape and dtype, the optimizer's settings (learning rate aside) and the choices that
    decide which collectives run (``setup``). ``lr0`` is only recorded."""

    entries: tuple[tuple[str, str, tuple[int, ...], str], ...]
    numel: int
    n_params: int
    optim: tuple[tuple[str, Any], ...]
    setup: tuple[tuple[str, Any], ...]
    lr0: float = field(compare=False, default=0.0)


def _signature(flat: FlatModel, optim: OptimConfig, setup: dict[str, Any],
               lr0: float) -> _Signature:
    from .flat import float_buffers, trainable

    ids = {id(p) for p in trainable(flat.model)}
    entries = [("parameter", n, tuple(p.shape), str(p.dtype))
               for n, p in flat.model.named_parameters() if id(p) in ids]
    entries += [("buffer", n, tuple(b.shape), str(b.dtype))
                for n, b in float_buffers(flat.model)]
    hp = {k: v for k, v in optim.model_dump().items() if k not in ("lr", "schedule")}
    return _Signature(tuple(entries), flat.numel, flat.n_params, tuple(sorted(hp.items())),
                      tuple(sorted(setup.items())), lr0)


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    return next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _differences(sigs: list[_Signature | None], ref: int) -> str | None:
    """The first rank whose signature differs from rank ``ref``'s, in words (or None)."""
    base = sigs[ref]
    assert base is not None
    for r, s in enumerate(sigs):
        if s is None or r == ref or s == base:
            continue
        for what, mine, theirs in (("setting", s.setup, base.setup),
                                   ("optimizer setting", s.optim, base.optim)):
            if mine != theirs:
                a, b = dict(mine), dict(theirs)
                k = _first_difference(a, b)
                return (f"rank {r}: {what} {k}={a.get(k)!r} but rank {ref} has "
                        f"{b.get(k)!r}: every rank must make the same choices")
        mine_e = {(e[0], e[1]): e[2:] for e in s.entries}
        theirs_e = {(e[0], e[1]): e[2:] for e in base.entries}
        for key, (shape, dtype) in theirs_e.items():
            if key not in mine_e:
                return f"rank {r}: its model has no {key[0]} {key[1]!r} (rank {ref}'s has)"
            if mine_e[key] != (shape, dtype):
                return (f"rank {r}: {key[0]} {key[1]!r} has shape {tuple(mine_e[key][0])} "
                        f"{mine_e[key][1]} but {tuple(shape)} {dtype} on rank {ref}: every "
                        "rank must build the same model")
        extra = sorted(set(mine_e) - set(theirs_e))
        if extra:
            return (f"rank {r}: its model has a {extra[0][0]} {extra[0][1]!r} that rank "
                    f"{ref}'s has not")
        return (f"rank {r}: its model registers its parameters and buffers in another order "
                f"than rank {ref}'s: build the model the same way on every rank")
    return None


def _agree(s: _Session, sig: _Signature | None, ref: int) -> _Signature:
    """Collective: gather every rank's signature at rank 0, compare with rank ``ref``'s
    and raise the same :class:`LoopError` on every rank if one differs. A barrier with a
    deadline comes first, so a rank that never gets here (it returned early) is a
    timeout, not a hang."""
    comm = s.comm
    _wait(comm.Ibarrier(), s, "every rank to build its DistributedOptimizer")
    sigs = comm.gather(sig, root=0)
    verdict = _differences(sigs, ref) if s.rank == 0 else None
    verdict, ref_sig = comm.bcast((verdict, sigs[ref] if s.rank == 0 else None), root=0)
    if verdict is not None:
        raise LoopError(verdict, collective=True)
    return ref_sig


def _wait(req: Any, s: _Session, what: str, deadline: float | None = None) -> None:
    from .transport.mpi import _wait as wait

    wait(req, s.timeout_s if deadline is None else deadline, f"rank {s.rank}: {what}",
         patient=True)


def _consensus(comm: Any, x: Tensor, n_params: int, size: int, s: _Session
               ) -> tuple[Tensor, dict[str, float]]:
    """(the average of every rank's ``x``, the consensus distances of
    :mod:`apam_gossip.core.consensus`) from two all-reduces, without gathering every
    model anywhere."""
    from mpi4py import MPI

    total = x.to(torch.float64, copy=True)  # the all-reduce works in place
    _wait(comm.Iallreduce(MPI.IN_PLACE, total, op=MPI.SUM), s, "averaging the models",
          NO_DEADLINE_S)
    sq = squares(x, n_params)
    _wait(comm.Iallreduce(MPI.IN_PLACE, sq, op=MPI.SUM), s, "the consensus distance",
          NO_DEADLINE_S)
    xbar, extra = consensus_from_sums(total, float(sq[0]), float(sq[1]), size, n_params)
    return xbar.float(), extra


# ----------------------------------------------------------------------- the optimizer
class DistributedOptimizer(torch.optim.Optimizer):
    """The optimizer of one rank in a loop-API job (see the module docstring).

    ``model``: the rank's model, already on :func:`device` and with any weights you load
    already loaded (float32). Its trainable parameters and float buffers are moved into
    one flat buffer (they stay ordinary parameters to your code; do not move the model
    afterwards). ``lr``: a number or a callable ``lr(step)``; ``optimizer`` and the other
    keywords are :class:`~apam_gossip.config.OptimConfig` fields (``amsgrad`` by default;
    ``beta1``, ``beta2``, ``eps``, ``bias_correction``, ``weight_decay``, ``momentum``,
    ``nesterov``); a scheduler that cycles momentum needs ``cycle_momentum=False``.
    ``broadcast=False`` keeps each rank's own initial model (decentralized and
    allreduce; for experiments such as gossip from different starts). Use as a context
    manager to call :meth:`finish` on leaving the block.
    """

    def __init__(self, model: nn.Module, lr: float | Callable[[int], float] = 1e-3, *,
                 optimizer: str = "amsgrad", broadcast: bool = True, **optim: Any) -> None:
        s = _current("DistributedOptimizer(...)")
        if s.master_done or (s.mode == "centralized" and s.comm is not None
                             and s.rank == 0):
            raise LoopError("rank 0 is the centralized master: it does not train (init() "
                            "returned its MasterHandle); skip your loop when ag.is_master()")
        if s.optimizer is not None:
            raise LoopError(f"rank {s.rank}: one DistributedOptimizer per job; call "
                            "finish() on the first one")
        if not isinstance(model, nn.Module):
            raise LoopError(f"rank {s.rank}: model must be an nn.Module, got "
                            f"{type(model).__name__}")
        for k in NOT_LOOP_SETTINGS:
            if k in optim:
                raise LoopError(f"rank {s.rank}: DistributedOptimizer({k}=...): the loop "
                                "API's learning rate is yours: pass lr as a function of the "
                                "step, or put a torch.optim.lr_scheduler on the optimizer")
        self.lr_fn = lr if callable(lr) else None
        lr0 = self._checked_lr(lr(1) if callable(lr) else lr, s.rank)
        try:  # lr 0 is allowed here (pure gossip); the config's lr is never read
            self.hp = OptimConfig(name=optimizer, lr=lr0 or 1.0, **optim)
        except ConfigError as e:
            raise LoopError(f"rank {s.rank}: DistributedOptimizer: {e}") from None
        ignored = ignored_settings({f"optim.{k}" for k in optim}, [s.mode], self.hp)
        if ignored and s.rank == (1 if s.mode == "centralized" and s.comm is not None else 0):
            _warn_ignored([f"{k[6:]}={optim[k[6:]]!r} ({why})" for k, why in ignored])
        if s.mode == "decentralized" and s.adaptive_state == "tracked" \
                and self.hp.name != "amsgrad":
            raise LoopError(f"rank {s.rank}: adaptive_state='tracked' needs "
                            "optimizer='amsgrad'")
        self.session = s
        self.model = model
        self.broadcast = bool(broadcast)
        self.lr0 = lr0
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, {"lr": lr0})
        self.flat = flatten(model, who=f"rank {s.rank}: the model")
        if self.flat.state.dtype != torch.float32:
            raise LoopError(f"rank {s.rank}: the model is {self.flat.state.dtype}; the loop "
                            "API moves float32 models (model.float())")
        self.opt = Optimizer(self.hp)
        self.steps = 0
        self.stepped = False  # a step() was taken in this job (resume must come first)
        self.version = 0
        self.samples = 0
        self._pending = 0
        self.step_s = 0.0
        self.staleness: Counter[int] = Counter()
        self.averages = self.refused = 0
        self.comm_thread = None  # decentralized with overlap: the thread that averages
        self.in_flight = None  # ... and the average it is running
        self.finished = False
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        self._dev_cpu = self.flat.state.device.type == "cpu"
        self.host = self.flat.state if self._dev_cpu else torch.zeros(self.flat.numel)
        s.optimizer = self
        self._start()
        atexit.register(self._finish_at_exit)
        self.t0: float | None = None  # the clock starts at the first step

    # -- helpers -----------------------------------------------------------------------
    @staticmethod
    def _checked_lr(value: Any, rank: int) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not 0 <= value <= 1e6 or value != value:
            raise LoopError(f"rank {rank}: lr must be a number in [0, 1e6] (or a function "
                            f"of the step returning one), got {value!r}")
        return float(value)

    def _count(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if first is not None and first.dim():
            self._pending += int(first.shape[0])

    def _lr(self, step: int) -> float:
        group = self.param_groups[0]
        if self.lr_fn is not None:
            group["lr"] = self.lr_fn(step)
        group["lr"] = self._checked_lr(group["lr"], self.session.rank)
        return group["lr"]

    def _to_host(self) -> Tensor:
        if not self._dev_cpu:
            self.host.copy_(self.flat.state)
        return self.host

    def _from_host(self) -> None:
        if not self._dev_cpu:
            self.flat.state.copy_(self.host)

    def _gather_grads(self) -> None:
        """Make sure the flat gradient holds every parameter's gradient: a zero_grad that
        set ``.grad = None`` (``model.zero_grad()``) detached them from the buffer. A
        parameter that left the flat state (the model was moved) is an error."""
        if self.flat.check_views():
            return
        lo, size = self.flat.state.data_ptr(), self.flat.state.element_size() * self.flat.numel
        off = 0
        for p in self.param_groups[0]["params"]:
            if not lo <= p.data_ptr() < lo + size:
                raise LoopError(f"{self.who}: the model's parameters were moved or replaced "
                                "after DistributedOptimizer was built (model.to(), .cuda(), "
                                "a new tensor): move and load the model first")
            n = p.numel()
            g = self.flat.grads[off: off + n]
            if p.grad is None:
                g.zero_()
            else:
                g.copy_(p.grad.reshape(-1))
            p.grad = g.view_as(p)
            off += n

    @property
    def who(self) -> str:
        return f"rank {self.session.rank}"

    # -- start: agree on the model, then the mode's own start ---------------------------
    def _start(self) -> None:
        s = self.session
        if s.comm is None:
            self.opt_state = self.opt.init(self.flat.params)
            return
        comm = s.comm
        setup = {"mode": s.mode, "adaptive_state": s.adaptive_state,
                 "broadcast": self.broadcast, "topology": s.topology}
        sig = _signature(self.flat, self.hp, setup, self.lr0)
        ref = 1 if s.mode == "centralized" else 0
        _agree(s, sig, ref)
        host = self._to_host()
        if self.broadcast or s.mode == "centralized":  # (the master owns the model there)
            _wait(comm.Ibcast(host, root=ref), s, f"the initial model from rank {ref}")
            self._from_host()
        if s.mode == "centralized":
            from .transport.mpi import MpiStarWorker

            self.end = MpiStarWorker(comm, self.flat.numel)
            self.end.send(None, Hello(self.end.worker))
            msg = self.end.recv(self.flat.state, s.timeout_s)
            assert isinstance(msg, Params), msg
            self.version = msg.version
        elif s.mode == "decentralized":
            from .algorithms.adpsgd import neighbor_picker
            from .algorithms.common import worker_seed
            from .core.gossip import GossipRule
            from .topology import neighbor_probabilities
            from .transport.mpi import MpiGossip

            tracked = s.adaptive_state == "tracked"
            self.gossip = MpiGossip(comm, host, tracked, 0, s.timeout_s,
                                    n_tracked=self.flat.n_params)
            self.rule = GossipRule(self.hp, s.size, self.flat.n_params, tracked)
            self.opt_state = self.rule.init_state()
            nb, probs = neighbor_probabilities(s.graph)[s.rank]
            self.pick = neighbor_picker(nb, probs, worker_seed(s.seed, s.rank) + 1) \
                if nb else None
            self.buffers0 = self.flat.buffers.clone()
            self.grad_cpu = torch.zeros(self.flat.n_params) if not self._dev_cpu else None
            self.v0 = self.gossip.version
            if s.overlap:
                from concurrent.futures import ThreadPoolExecutor

                self.comm_thread = ThreadPoolExecutor(1, thread_name_prefix="gossip-average")
            _wait(comm.Ibarrier(), s, "every rank's gossip server to start")
        else:
            self.opt_state = self.opt.init(self.flat.params)
            self.red = torch.zeros(self.flat.numel + 2)  # [grads | buffers | active | lr]

    # -- torch.optim.Optimizer --------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients in place (they are views into the flat buffer, which a
        ``None`` would detach; ``set_to_none`` is accepted and ignored)."""
        self._gather_grads()
        self.flat.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of this rank's model with the gradients its last backward left."""
        if self.finished:
            raise LoopError(f"{self.who}: step() after finish()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = time.perf_counter()
        if self.t0 is None:
            self.t0 = time.monotonic()
        self.stepped = True
        self._gather_grads()
        if not math.isfinite(float(self.flat.grads.sum())):  # any NaN/inf entry
            raise LoopError(f"{self.who}: the gradient has non-finite entries at step "
                            f"{self.steps + 1} (try a smaller learning rate)")
        samples, self._pending = self._pending, 0
        s = self.session
        if s.comm is None:
            self.opt.update(self.flat.params, self.flat.grads, self.opt_state,
                            lr=self._lr(self.steps + 1))
        elif s.mode == "centralized":
            self._step_centralized(samples)
        elif s.mode == "decentralized":
            self._step_decentralized()
        else:
            self._step_allreduce(active=True)
        self.steps += 1
        self.samples += samples
        self.step_s += time.perf_counter() - t
        return loss

    def _step_centralized(self, samples: int) -> None:
        msg = self.flat.pack_grad_msg()
        self.end.send(msg, Grad(self.version, samples, float("nan"), 0.0,
                                self._lr(self.version + 1)))
        back = self.end.recv(self.flat.state, self.session.timeout_s)
        if isinstance(back, LoopFault):
            raise LoopError(back.message)
        if not isinstance(back, Params):
            raise RuntimeError(f"{self.who}: the master answered {back!r} to a gradient")
        self.version = back.version

    def _step_decentralized(self) -> None:
        g = self.flat.grads
        if self.grad_cpu is not None:
            self.grad_cpu.copy_(g)
            g = self.grad_cpu
        rule = self.rule
        delta = rule.buffer_delta(self.flat.buffers, self.buffers0)
        lr = rule.lr(self._lr(self.steps + 1))
        averaged = self._join_average() if self.in_flight is not None else self._average()
        v1 = self.gossip.update_local(rule.step(g, self.opt_state, lr, delta))
        self.staleness[rule.staleness(self.v0, v1, averaged)] += 1
        self._refresh()
        if self.comm_thread is not None:  # the next average runs beside your next gradient
            self.in_flight = self.comm_thread.submit(self._average)

    def _average(self) -> bool:
        """One average with a random neighbour (a refusal is retried with another)."""
        from .algorithms.adpsgd import average_with_a_neighbour

        averaged, refusals = average_with_a_neighbour(self.gossip, self.pick)
        self.averages += averaged
        self.refused += refusals
        return averaged

    def _join_average(self) -> bool:
        """Wait for the average started at the last step (its error is raised here)."""
        fut, self.in_flight = self.in_flight, None
        return fut.result() if fut is not None else False

    def _refresh(self) -> None:
        """The next gradient is computed at a snapshot of x_i (averages keep arriving)."""
        self.v0 = self.gossip.snapshot(self.host)
        self._from_host()
        if self.flat.n_buffers:
            self.buffers0.copy_(self.flat.buffers)

    def _step_allreduce(self, active: bool) -> bool:
        """One all-reduce of ``[grads | buffers | 1 | lr]`` (``active``) or of zeros (a
        rank that finished: it still takes the step, so every replica stays the same);
        returns False once no rank is active any more. Every rank steps with the mean lr
        of the active ranks (they agree, being at the same step of the same schedule), so
        a rank that finished early follows the schedule too instead of keeping its last
        lr. No deadline: the other ranks may be busy with anything between their steps (an
        evaluation); a dead rank ends the job."""
        s, red, n = self.session, self.red, self.flat.numel
        if active:
            red[:n].copy_(self.flat.pack_grad_msg())
            red[n] = 1.0
            red[n + 1] = self._lr(self.steps + 1)
        else:
            red.zero_()
        from mpi4py import MPI

        _wait(s.comm.Iallreduce(MPI.IN_PLACE, red, op=MPI.SUM), s, "the all-reduce",
              NO_DEADLINE_S)
        k = float(red[n])
        if k == 0:
            return False
        lr = float(red[n + 1]) / k  # the same number on every rank (to float32's 1e-7)
        mean = red[:n].div_(k).to(self.flat.state.device)
        allreduce_step(self.opt, self.flat.params, self.flat.buffers, mean, self.opt_state, lr)
        return True

    # -- the end ------------------------------------------------------------------------
    def finish(self, metric: float | Callable[[nn.Module], float] | None = None,
               metric_name: str = "accuracy", higher_is_better: bool = True,
               average: bool = False, quiet: bool = False) -> LoopSummary:
        """End this rank's loop; collective (every rank calls it, and waits for the
        others however long they still train).

        Centralized workers end with the master's final model; ``average``
        (decentralized; every rank must pass the same) sets every rank's model to the
        average of all. ``metric``: the score of the run, recorded in the result under
        ``metric_name``: a number you measured, or a function ``metric(model)`` called on
        the final model (so after the master's model arrived, or after the average) -- by
        rank 0, or in centralized mode by the first worker (rank 1). Rank 0 prints a
        per-rank summary (unless ``quiet``) and writes ``init(result=...)``.
        """
        if self.finished:
            raise LoopError(f"{self.who}: finish() was called twice")
        self.finished = True
        self._hook.remove()
        atexit.unregister(self._finish_at_exit)
        s = self.session
        global _session
        try:
            if self.comm_thread is not None:  # the last average: no local step follows
                try:
                    self._join_average()
                finally:
                    self.comm_thread.shutdown()
            wall = time.monotonic() - self.t0 if self.t0 is not None else 0.0
            rep = LoopReport(s.rank, str(self.flat.state.device), self.steps, self.samples,
                             wall, self.step_s, self.averages, self.refused,
                             dict(self.staleness))
            extra: dict[str, float] = {}
            final = self.flat.state.detach().cpu()
            if s.comm is None:
                reports = [rep]
            elif s.mode == "centralized":
                first = s.rank == 1
                later = first and callable(metric)
                self.end.send(None, Done(rep, metric if first and not later else None,
                                         later, metric_name, higher_is_better))
                msg = self.end.recv(None, NO_DEADLINE_S)  # until every worker is done
                assert isinstance(msg, Stop), msg
                host = self._to_host()
                _wait(s.comm.Ibcast(host, root=0), s, "the final model from the master")
                self._from_host()
                if later:
                    s.comm.send(_score(metric, self.model, self.who), dest=0, tag=T_METRIC)
                return LoopSummary(s.rank, [rep], None)
            elif s.mode == "decentralized":
                self.gossip.finish(timeout=NO_DEADLINE_S)
                self._refresh()
                reports, extra, final = self._end_decentralized(rep, average)
            else:
                while self._step_allreduce(active=False):
                    pass
                reports = s.comm.gather(rep, root=0)
            if s.rank != 0:
                return LoopSummary(s.rank, [rep], None)
            if callable(metric):
                metric = _score(metric, self.model, self.who)
            result = loop_result(s, self.hp, self.lr0, reports, self.flat.n_params, final,
                                 metric, metric_name, higher_is_better, extra,
                                 staleness=_merged(reports),
                                 updates=sum(r.steps for r in reports))
            _finish_rank0(s, result, reports, quiet)
            return LoopSummary(s.rank, reports, result)
        finally:
            s.optimizer = None
            _session = None

    def _end_decentralized(self, rep: LoopReport, average: bool
                           ) -> tuple[list[LoopReport], dict[str, float], Tensor]:
        """Gather the reports, check that every rank chose the same ``average``, and
        measure consensus (and average, if asked) with all-reduces."""
        s = self.session
        comm = s.comm
        reports = comm.gather((rep, bool(average)), root=0)
        verdict = None
        if s.rank == 0 and len({a for _, a in reports}) > 1:
            odd = next(r for r, (_, a) in enumerate(reports) if a != bool(average))
            verdict = (f"rank {odd}: finish(average={not average}) but rank 0 has "
                       f"average={average}: every rank must pass the same")
        verdict = comm.bcast(verdict, root=0)
        if verdict is not None:
            raise LoopError(verdict, collective=True)
        xbar, extra = _consensus(comm, self.gossip.x, self.flat.n_params, s.size, s)
        if average:
            self.host.copy_(xbar)
            self._from_host()
        if s.rank != 0:
            return [], extra, xbar
        reports = [r for r, _ in reports]
        extra["averages"] = float(sum(r.averages for r in reports))
        extra["refused_averages"] = float(sum(r.refused_averages for r in reports))
        return reports, extra, xbar

    def _finish_at_exit(self) -> None:
        """A script that ends without ``finish()`` would leave the other ranks waiting:
        finish for it (the other ranks' ``finish()`` is collective). Not after a crash:
        then the job ends (under MPI the exception hook aborted it already)."""
        if self.finished or _crashed:
            return
        print(f"{PROG}: warning: {self.who} ended without opt.finish(); finishing "
              "now", file=sys.stderr, flush=True)
        try:
            self.finish()
        except BaseException as e:  # noqa: BLE001 - at exit nobody else would see it
            print(f"{PROG}: error: {self.who}: finishing at exit failed: "
                  f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if self.session.comm is not None:
                self.session.comm.Abort(1)

    def __enter__(self) -> DistributedOptimizer:
        return self

    def __exit__(self, tp, e, tb) -> None:
        if e is None and not self.finished:
            self.finish()

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What resuming this rank needs: the model state, the optimizer state and the
        counters (centralized: the master's model, state and update count)."""
        if self.finished:
            raise LoopError(f"{self.who}: state_dict() after finish(): take it before")
        s = self.session
        d: dict[str, Any] = {"apam_gossip_loop": 1, "mode": s.mode, "rank": s.rank,
                             "size": s.size, "steps": self.steps,
                             "lr": self.param_groups[0]["lr"], "optimizer": self.hp.name}
        if s.comm is not None and s.mode == "centralized":
            self.end.send(None, StateRequest())
            st = self.end.recv(None, s.timeout_s)
            assert isinstance(st, LoopState), st
            d.update(x=torch.from_numpy(st.x), version=st.version,
                     opt={k: torch.from_numpy(v) for k, v in st.opt.items()})
            return d
        if s.mode == "decentralized":
            d["adaptive_state"] = s.adaptive_state
        if s.comm is not None and s.mode == "decentralized":
            with self.gossip.lock:
                d["x"] = self.gossip.x.clone()
                if self.gossip.u is not None:
                    d["u"] = self.gossip.u.clone()
        else:
            d["x"] = self.flat.state.detach().cpu().clone()
        d["opt"] = {k: v.detach().cpu().clone() for k, v in self.opt_state.items()}
        d["version"] = self.steps
        return d

    def _check_state(self, d: Any) -> dict[str, Any]:
        s = self.session
        if not isinstance(d, dict) or d.get("apam_gossip_loop") != 1:
            raise LoopError(f"{self.who}: load_state_dict: not a DistributedOptimizer "
                            "state_dict")
        if d["mode"] != s.mode:
            raise LoopError(f"{self.who}: load_state_dict: the state is of mode "
                            f"{d['mode']!r}, this job's is {s.mode!r}")
        if d.get("optimizer") != self.hp.name:
            raise LoopError(f"{self.who}: load_state_dict: the state is of optimizer "
                            f"{d.get('optimizer')!r}, this one is {self.hp.name!r}")
        if not isinstance(d.get("x"), Tensor) or d["x"].numel() != self.flat.numel:
            raise LoopError(f"{self.who}: load_state_dict: the state's model does not match "
                            f"this one ({self.flat.numel} entries)")
        if s.mode == "decentralized":
            theirs = d.get("adaptive_state", "tracked" if "u" in d else "local")
            if theirs != s.adaptive_state:  # a tracked job from a local state collapses
                raise LoopError(f"{self.who}: load_state_dict: the state is of "
                                f"adaptive_state {theirs!r}, this job's is "
                                f"{s.adaptive_state!r}: resume with init(adaptive_state="
                                f"{theirs!r}), or start afresh")
        if s.mode == "decentralized" and (d["rank"], d["size"]) != (s.rank, s.size):
            raise LoopError(f"{self.who}: load_state_dict: the state is rank {d['rank']} of "
                            f"{d['size']}; load each rank's own state into the same ranks")
        if self.stepped:
            raise LoopError(f"{self.who}: load_state_dict() after training started: load "
                            "before the first step()")
        want = set(self.opt.init(torch.zeros(1)))
        if set(d["opt"]) != want:
            raise LoopError(f"{self.who}: load_state_dict: the optimizer state has "
                            f"{sorted(d['opt'])}, this optimizer needs {sorted(want)}")
        return {**d, "x": d["x"].detach().cpu(),
                "opt": {k: v.detach().cpu() for k, v in d["opt"].items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`, before the first step; collective. Centralized:
        every worker loads (the same state: the master's), and the master resumes from it
        once all have. Decentralized: every rank loads its own state (same ranks, same
        number). Resuming reproduces the uninterrupted run where the run is deterministic
        (one worker, allreduce); gossip resumes every model and optimizer state, but the
        order of later averages is random anyway."""
        d = self._check_state(state_dict)
        s = self.session
        self.steps = int(d["steps"])
        self.param_groups[0]["lr"] = d["lr"]
        if s.comm is not None and s.mode == "centralized":
            self.end.send(None, LoopState(d["x"].numpy(), {k: v.numpy() for k, v in
                                                          d["opt"].items()},
                                          int(d["version"])))
            back = self.end.recv(self.flat.state, NO_DEADLINE_S)  # until all have loaded
            if isinstance(back, LoopFault):
                raise LoopError(back.message)
            assert isinstance(back, Params), back
            self.version = back.version
            return
        self.opt_state = {k: v.clone().to(self.opt_state[k].device)
                          for k, v in d["opt"].items()}
        if s.comm is not None and s.mode == "decentralized":
            with self.gossip.lock:
                self.gossip.x.copy_(d["x"])
                if self.gossip.u is not None and "u" in d:
                    self.gossip.u.copy_(d["u"])
            self._refresh()
            # nobody averages before every rank has its state back
            _wait(s.comm.Ibarrier(), s, "every rank to load its state", NO_DEADLINE_S)
        else:
            self.flat.state.copy_(d["x"])


# ---------------------------------------------------------------------- the master
@dataclass
class MasterHandle:
    """What a centralized master's :func:`init` returns with ``master="return"``."""

    result: RunResult
    state: Tensor  # the final model: [trained parameters | float buffers]

    def load_into(self, model: nn.Module) -> nn.Module:
        """Copy the final model into ``model`` (built as the workers build theirs)."""
        flat = flatten(model, who="the model")
        if flat.numel != self.state.numel():
            raise LoopError(f"the model has {flat.numel} entries, the master's "
                            f"{self.state.numel()}: build the workers' model")
        flat.state.copy_(self.state)
        return model


class _LoopMaster:
    """Rank 0 of a centralized loop-API job: the APAM master's rule
    (:class:`~apam_gossip.core.apam.ApamCore`) driven by the workers' loops instead of a
    budget: each gradient brings its worker's lr, and it serves until every worker has
    finished."""

    def __init__(self, s: _Session, sig: _Signature, x0: Tensor) -> None:
        from .core.apam import ApamCore
        from .transport.mpi import MpiStarMaster

        self.s = s
        self.lr0 = sig.lr0
        self.end = MpiStarMaster(s.comm, sig.numel, timeout=s.timeout_s, pin=False)
        self.hp = OptimConfig(**dict(sig.optim), lr=sig.lr0 or 1.0)
        self.n = self.end.n_workers
        self.m = ApamCore(x0, self.hp, self.n, n_params=sig.n_params)
        self.done: dict[int, Done] = {}
        self.loading: dict[int, LoopState] = {}
        self.applied = False

    def fault(self, i: int, message: str) -> None:
        self.end.send(i, None, LoopFault(message))

    def on_load(self, i: int, st: LoopState) -> None:
        """A worker's load_state_dict: resume once every live worker has loaded."""
        m = self.m
        if self.applied:
            self.fault(i, f"rank {i + 1}: load_state_dict() after training started: every "
                       "worker loads before its first step()")
            return
        if self.done:
            self.fault(i, f"rank {i + 1}: load_state_dict() after rank {min(self.done) + 1} "
                       "finished without loading: every worker loads the same state before "
                       "its first step(), or none does")
            return
        self.loading[i] = st
        if set(self.loading) != set(range(self.n)) - set(self.done):
            return  # the others are still loading: their replies wait
        first = self.loading[min(self.loading)]
        for j, other in self.loading.items():
            if other.version != first.version or not np.array_equal(other.x, first.x):
                for k in self.loading:
                    self.fault(k, f"rank {j + 1}: load_state_dict: its state (update "
                               f"{other.version}) is not rank {min(self.loading) + 1}'s "
                               f"(update {first.version}): load the same checkpoint on "
                               "every worker")
                self.loading.clear()
                return
        m.restore(torch.from_numpy(first.x),
                  {k: torch.from_numpy(v) for k, v in first.opt.items()},
                  version=int(first.version))
        for j in sorted(self.loading):
            self.end.send(j, m.x, Params(m.version))
        self.loading.clear()

    def serve(self) -> MasterHandle:
        m, end, s = self.m, self.end, self.s
        waiting = set(range(self.n))
        while waiting:  # every worker has its model (a rank that dies ends the job)
            for i in end.ready(1.0):
                msg, _ = end.recv(i)
                assert isinstance(msg, Hello), msg
                waiting.discard(i)
        for i in range(self.n):
            end.send(i, m.x, Params(0))
        while set(range(self.n)) - set(self.done):
            # no deadline: a worker may do anything between two steps (an evaluation);
            # a rank that dies ends the whole job
            for i in end.ready(1.0):
                msg, grad = end.recv(i)
                if isinstance(msg, Grad):
                    if self.loading:
                        self.fault(i, f"rank {i + 1}: step() while other workers load a "
                                   "checkpoint: every worker loads before its first step()")
                        continue
                    m.apply(i, grad, msg.version, msg.samples, msg.lr)
                    self.applied = True
                    end.send(i, m.model_for_workers(), Params(m.version))
                elif isinstance(msg, Done):
                    self.done[i] = msg
                    # the loading workers wait for every live worker to load: one that
                    # finished instead never will (misuse: one line, not a hang)
                    for k in sorted(self.loading):
                        self.fault(k, f"rank {k + 1}: load_state_dict() while rank {i + 1} "
                                   "finished without loading: every worker loads the same "
                                   "state before its first step(), or none does")
                    self.loading.clear()
                elif isinstance(msg, StateRequest):
                    assert m.state is not None
                    end.send(i, None, LoopState(m.x.numpy().copy(), {
                        k: v.numpy().copy() for k, v in m.state.items()}, m.version))
                elif isinstance(msg, LoopState):
                    self.on_load(i, msg)
                else:
                    raise AssertionError(f"unexpected message from rank {i + 1}: {msg!r}")
        for i in sorted(self.done):
            end.send(i, None, Stop())
        _wait(s.comm.Ibcast(m.x, root=0), s, "sending the final model")
        reports = [self.done[i].report for i in sorted(self.done)]
        first = self.done.get(0)
        metric = first.metric if first is not None else None
        name, higher = (first.metric_name, first.higher_is_better) if first is not None \
            else ("accuracy", True)
        if first is not None and first.metric_follows:  # rank 1 scores the final model
            req = s.comm.irecv(source=1, tag=T_METRIC)
            deadline = time.monotonic() + NO_DEADLINE_S
            while True:
                ok, metric = req.test()
                if ok:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("rank 0 (master): no metric from rank 1")
                time.sleep(0.01)
        result = loop_result(s, self.hp, self.lr0, reports, m.n_params, m.x, metric, name,
                             higher, {}, staleness=dict(m.progress.staleness),
                             updates=m.progress.version)
        _finish_rank0(s, result, reports, quiet=False)
        return MasterHandle(result, m.x.clone())


def _run_master(s: _Session) -> MasterHandle:
    """Rank 0 of a centralized job: agree on the model with the workers, take rank 1's
    as the start, serve until all have finished."""
    sig = _agree(s, None, 1)
    x0 = torch.zeros(sig.numel)
    _wait(s.comm.Ibcast(x0, root=1), s, "the initial model from rank 1")
    return _LoopMaster(s, sig, x0).serve()


# ---------------------------------------------------------------------- the result
@dataclass
class LoopSummary:
    """What ``finish()`` returns: this rank's report (rank 0: every rank's) and, on rank 0,
    the job's RunResult."""

    rank: int
    reports: list[LoopReport]
    result: RunResult | None

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "reports": [asdict(r) for r in self.reports]}


def _merged(reports: list[LoopReport]) -> dict[int, int]:
    out: Counter[int] = Counter()
    for r in reports:
        out.update({int(k): v for k, v in r.staleness.items()})
    return dict(out)


def loop_result(s: _Session, hp: OptimConfig, lr0: float, reports: list[LoopReport],
                n_params: int, final: Tensor, metric: float | None, metric_name: str,
                higher_is_better: bool, extra: dict[str, float], staleness: dict[int, int],
                updates: int) -> RunResult:
    """The job's RunResult, as ``train`` writes one (``compare --results`` reads it); its
    one evaluation is the end of the run, with the metric the user measured (if any).
    ``final``: the final model (centralized: the master's; decentralized: the average;
    allreduce: the common replica)."""
    wall = max((r.wall_time for r in reports), default=0.0)
    samples = sum(r.samples for r in reports)
    workers = [WorkerStats(i, r.device, 1.0, r.steps, r.samples,
                           r.samples / wall if wall > 0 else 0.0, r.wall_time - r.step_s, 0.0)
               for i, r in enumerate(reports)]
    value = float("nan") if metric is None else float(metric)
    ev = EvalRecord(wall, samples, updates, None, float("nan"), value, dict(extra))
    optim = {**hp.model_dump(), "lr": lr0}
    config = {"mode": s.mode, "workers": len(reports), "api": "loop", "seed": s.seed,
              "optim": optim, "topology": s.topology if s.mode == "decentralized" else None,
              "adaptive_state": s.adaptive_state}
    return RunResult(config=config, mode=s.mode,
                     transport="mpi" if s.comm is not None else "local",
                     n_params=n_params, wall_time=wall, updates=updates,
                     samples=samples, evals=[ev], staleness=staleness, workers=workers,
                     final_params=final.detach().cpu().clone(), metric=metric_name,
                     higher_is_better=higher_is_better, task={"api": "loop"})


def summary_table(result: RunResult, reports: list[LoopReport]) -> str:
    """The per-rank summary rank 0 prints at the end."""
    mode = result.mode
    first = 1 if mode == "centralized" and result.transport == "mpi" else 0
    lines = [f"{PROG}: {mode} finished: {result.updates} updates, {result.samples} "
             f"samples in {result.wall_time:.2f} s ({result.samples_per_s:.0f} samples/s)"]
    if mode == "centralized":
        lines[0] += (f"; staleness mean {result.staleness_mean():.2f} max "
                     f"{max(result.staleness, default=0)}")
    elif mode == "decentralized":
        c = result.evals[-1].extra.get("consensus_distance")
        if c is not None:
            lines[0] += f"; consensus distance {c:.3e}"
    head = f"  {'rank':>4} {'device':>8} {'steps':>7} {'samples':>9} {'samples/s':>10}"
    if mode == "decentralized":
        head += f" {'averages':>9} {'refused':>8} {'staleness mean':>15}"
    lines.append(head)
    for i, r in enumerate(reports):
        row = (f"  {i + first:>4} {r.device:>8} {r.steps:>7} {r.samples:>9} "
               f"{r.samples / r.wall_time if r.wall_time > 0 else 0:>10.0f}")
        if mode == "decentralized":
            n = sum(r.staleness.values())
            mean = sum(int(k) * v for k, v in r.staleness.items()) / n if n else 0.0
            row += f" {r.averages:>9} {r.refused_averages:>8} {mean:>15.2f}"
        lines.append(row)
    return "\n".join(lines)


def _finish_rank0(s: _Session, result: RunResult, reports: list[LoopReport],
                  quiet: bool) -> None:
    if not quiet:
        print(summary_table(result, reports), flush=True)
    if s.result is not None:
        result.save(s.result)
        if not quiet:
            print(f"{PROG}: result written to {s.result}", flush=True)


def _reset() -> None:
    """Forget the session (tests; a finished optimizer already did)."""
    global _session
    _session = None


__all__ = ["init", "rank", "size", "local_rank", "is_master", "num_workers", "worker_index",
           "device", "DistributedOptimizer", "MasterHandle", "LoopSummary", "LoopError"]
