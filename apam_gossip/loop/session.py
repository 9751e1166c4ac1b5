"""The session of a loop-API job: :func:`init` (the checks every rank agrees on, the
placement of each rank, the master's start), the queries (:func:`rank`, :func:`device`,
...) and the exception hook that ends a whole MPI job on one rank's error."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch

from ..config import OptimConfig, ignored_settings
from ..errors import UserError
from ..files import check_output_path
from ..placement import available_cores, node_placement
from ..topology import make_topology, validate_topology
from ..transport.mpi import launched_by_mpi, require_thread_multiple, world
from .agree import agreed
from .base import (
    ADAPTIVE_STATES,
    INIT_DEFAULTS,
    MASTER_CHOICES,
    MODES,
    PROG,
    TORCHRUN_VARS,
    TRAITS,
    LoopError,
    Session,
    warn_ignored,
)
from .master import MasterHandle, run_master
from .torchcomm import launched_by_torchrun

_session: Session | None = None
_finished: Session | None = None  # the last session, after its finish()
_hooked = False
_crashed = False  # an uncaught exception is on its way out: no finish() at exit


def _env_rank() -> str:
    for k in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "RANK"):
        if k in os.environ:
            return f"rank {os.environ[k]}"
    return "this process"


def current(what: str, after_finish: bool = True) -> Session:
    """The session; with ``after_finish`` (the queries, the collectives) the one that
    ended with ``finish()`` still answers, so ``if ag.is_main_worker(): save(...)`` works
    after the loop as before it."""
    if _session is not None:
        return _session
    if after_finish and _finished is not None:
        return _finished
    _install_hooks()
    raise LoopError(f"{_env_rank()}: {what} before apam_gossip.init(): call "
                    "ag.init(mode=...) first")


def _install_hooks() -> None:
    """Once per process: note an uncaught exception (so no ``finish()`` runs at exit for
    a crashed script), and under MPI end the whole job on one (no rank left waiting): a
    user error as one line naming the rank and exit 2, anything else with its traceback
    and exit 1."""
    global _hooked
    if _hooked:
        return
    _hooked = True
    previous = sys.excepthook
    mpi = launched_by_mpi()
    torchrun = not mpi and launched_by_torchrun()

    def hook(tp, e, tb) -> None:
        global _crashed
        _crashed = True
        if not mpi and not torchrun:
            previous(tp, e, tb)
            return
        if mpi:
            comm, rank, _ = world()
        else:  # torchrun: end this process; its agent stops the others
            from .torchcomm import TorchComm

            comm, rank = TorchComm.__new__(TorchComm), int(os.environ["RANK"])
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
         overlap: bool = True, log: str | list[str] | None = None,
         master_shards: int = 1, compress: str = "none", compress_gamma: float | None = None,
         neighbour_choice: str = "uniform") -> MasterHandle | None:
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
    decentralized, average with the neighbor in a second thread while your loop computes
    the next gradient (as ``train`` does; False: inside ``step()``). A setting that does
    not apply to ``mode`` (``topology`` with ``centralized``, say) is named in one
    ``warning: ignored:`` line and the job goes on, as on the command line, so a script
    switches modes by one word. ``log``: rank 0 writes the run's metrics there,
    ``"tensorboard:DIR"`` or ``"jsonl:PATH"`` or a list (see :mod:`apam_gossip.runlog`):
    its own throughput every few seconds, then the result's evaluations and summary at
    ``finish()``. ``master_shards``: centralized under MPI, K master ranks (0..K-1), each
    owning a contiguous slice of the model and its AMSGrad state (``train
    --master-shards``); the workers are the ranks from K on, ``state_dict()`` is one
    consistent state across the shards and loads with any K. ``compress``,
    ``compress_gamma``, ``neighbour_choice``: decentralized, as ``train --compress
    none|int8|topk:F``, ``--compress-gamma``, ``--neighbour-choice uniform|fast`` (with
    ``broadcast=False`` the edges' public copies start at zero, as CHOCO-SGD's). Returns
    None except on a returning master (every shard returns the whole final model).

    The library's messages go through the Python logger ``apam_gossip`` (see
    :mod:`apam_gossip.runlog`): your ``logging`` configuration applies to them.

    Under MPI every rank's checks are agreed before anything collective: an error that
    only some ranks raise (a topology file missing on one host) is printed by rank 0,
    naming each rank that failed, and ends the job with exit code 2.
    """
    global _session, _finished
    _install_hooks()
    if _session is not None:
        raise LoopError(f"rank {_session.rank}: apam_gossip.init() was called twice; call "
                        "opt.finish() before starting again")
    mpi = launched_by_mpi()
    torchrun = not mpi and launched_by_torchrun()
    if not mpi and not torchrun and any(k in os.environ for k in TORCHRUN_VARS):
        raise LoopError("started by torchrun without its rendezvous variables (RANK, "
                        "WORLD_SIZE, MASTER_ADDR, MASTER_PORT): start the script with "
                        "`torchrun --nproc-per-node N script.py` or `apam-gossip launch -n N "
                        "script.py`")
    if torchrun and mode != "allreduce" and mode in MODES:
        raise LoopError(f"every rank: mode {mode!r} needs MPI (its asynchronous exchanges "
                        "are built on MPI's point-to-point, not torch.distributed's): start "
                        "the script with `apam-gossip launch -np N script.py`, or use "
                        "mode='allreduce' under torchrun", collective=True)
    comm, rank, size = None, 0, 1
    if mpi:
        comm, rank, size = world()
    elif torchrun:
        from .torchcomm import TorchComm

        comm = TorchComm(timeout_s if isinstance(timeout_s, int | float) else 600.0)
        rank, size = comm.Get_rank(), comm.Get_size()
    values = {"topology": topology, "adaptive_state": adaptive_state, "overlap": overlap,
              "master": master, "master_shards": master_shards, "compress": compress,
              "compress_gamma": compress_gamma, "neighbour_choice": neighbour_choice}
    given = {k for k, v in values.items() if v != INIT_DEFAULTS[k]}
    graph = None
    metrics = None
    problem: UserError | None = None
    try:  # this rank's own checks: nothing collective before every rank has passed them
        _check_init(mode, master, adaptive_state, device, timeout_s, threads, overlap,
                    result if rank == 0 else None, comm, size,  # rank 0 writes it
                    master_shards)
        _check_gossip(compress, compress_gamma, neighbour_choice, adaptive_state)
        if TRAITS[mode].gossip:
            graph = _topology(topology, size, seed)
        if rank == 0:
            from ..runlog import MetricsLog, as_specs

            try:
                metrics = MetricsLog(as_specs(log)) or None
            except TypeError as e:
                raise LoopError(str(e)) from None
    except UserError as e:
        problem = e
    agreed(comm, rank, problem, 600.0 if problem is not None else timeout_s)
    traits = TRAITS[mode]
    ignored = ignored_settings(given, [mode], OptimConfig())
    if "compress_gamma" in given and mode == "decentralized" \
            and str(compress).strip().lower() == "none":  # (train's table has the run)
        ignored.append(("compress_gamma", "applies with compress int8 or topk:F"))
    if ignored and rank == 0:
        warn_ignored([f"{k}={values[k]!r} ({why})" for k, why in ignored])
    if any(k == "topology" for k, _ in ignored):
        topology = None
    if any(k == "master_shards" for k, _ in ignored) or comm is None:
        master_shards = 1  # (one process: no master at all)
    if comm is None:
        from ..runlog import say

        say(f"{PROG}: no MPI launcher: running as one process (start N with `apam-gossip "
            "launch -n N script.py`)")
    worker_here, local_rank = 0, 0  # this rank's index among the training ranks on its host
    if comm is not None:
        local_rank, on_node, masters_here = comm.local_placement() if torchrun \
            else node_placement(comm, master_shards if traits.master else 0)
        worker_here = local_rank - masters_here
        if threads is None:
            threads = max(1, available_cores() // on_node)
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device("cpu")
    s = Session(traits, comm, rank, size, local_rank, dev, topology, adaptive_state, seed,
                float(timeout_s), result, overlap=overlap, graph=graph, metrics=metrics,
                master_shards=master_shards, compress=compress,
                compress_gamma=compress_gamma, neighbour_choice=neighbour_choice)
    if torchrun:  # no master there (allreduce only)
        s.workers_comm = comm.Split()
    elif comm is not None:  # collective: every rank, the master too, takes part
        from mpi4py import MPI

        s.workers_comm = comm.Split(MPI.UNDEFINED if s.is_master else 0, rank)
        if s.has_master and not s.is_master and master == "exit":
            from .world import guard_world

            guard_world(rank)
    if device == "auto" and torch.cuda.is_available() and not s.is_master:
        s.device = torch.device("cuda", worker_here % torch.cuda.device_count())
        torch.cuda.set_device(s.device)
    _session, _finished = s, None
    if s.is_master:
        handle = run_master(s)
        s.master_done = True
        if master == "exit":
            sys.stdout.flush()
            sys.stderr.flush()
            sys.exit(0)
        return handle
    return None


def _check_init(mode: str, master: str, adaptive_state: str, device: str, timeout_s: Any,
                threads: Any, overlap: Any, result: str | None, comm: Any, size: int,
                master_shards: Any = 1) -> None:
    """:func:`init`'s own checks of its arguments (no communication)."""
    if mode == "syncps":  # a mode of `train` only
        raise LoopError("mode 'syncps' is not available in the loop API: use "
                        "`apam-gossip train --mode syncps`")
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
    if isinstance(master_shards, bool) or not isinstance(master_shards, int) \
            or not 1 <= master_shards <= 1024:
        raise LoopError(f"master_shards must be an integer from 1 to 1024, got "
                        f"{master_shards!r}")
    if result is not None:
        if not isinstance(result, str | os.PathLike):
            raise LoopError(f"result must be a file path, got {type(result).__name__}")
        try:
            check_output_path(result, "result")
        except UserError as e:
            raise LoopError(str(e)) from None
    if comm is not None:
        if TRAITS[mode].gossip:
            require_thread_multiple("decentralized mode (a server thread serves averages "
                                    "beside your training loop)")
        if TRAITS[mode].master and size < 2:
            raise LoopError("centralized mode needs a master and at least one worker: "
                            "launch 2 or more ranks (or run without a launcher for one "
                            "process)")
        if TRAITS[mode].master and size < master_shards + 1:
            raise LoopError(f"master_shards={master_shards} takes ranks 0-{master_shards - 1} "
                            f"and the job has {size} ranks: launch {master_shards + 1} or "
                            "more (the workers are the ranks after the shards), or give "
                            "fewer shards")


def _check_gossip(compress: Any, gamma: Any, choice: Any, adaptive_state: str) -> None:
    """:func:`init`'s checks of the gossip exchange's settings."""
    from ..core.compress import parse_compress

    if not isinstance(compress, str):
        raise LoopError(f"compress must be 'none', 'int8' or 'topk:F', got {compress!r}")
    try:
        comp = parse_compress(compress)
    except ValueError as e:
        raise LoopError(str(e)) from None
    if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, int | float)
                              or not 0 < gamma <= 1):
        raise LoopError(f"compress_gamma must be a number in (0, 1], got {gamma!r}")
    if choice not in ("uniform", "fast"):
        raise LoopError(f"neighbour_choice must be 'uniform' or 'fast', got {choice!r}")
    if comp is not None and adaptive_state == "tracked":
        raise LoopError("compress with adaptive_state='tracked': a compressed average moves "
                        "the models only; use adaptive_state='local'")


def _topology(spec: str | None, size: int, seed: int) -> Any:
    spec = spec if spec is not None else "ring"
    try:
        return validate_topology(make_topology(spec, size, seed), size,
                                 resize="launch -n {n} (one rank per node)")
    except UserError as e:
        raise LoopError(f"topology {spec}: {e} (the job has {size} rank"
                        f"{'s' if size != 1 else ''})") from None



def rank() -> int:
    """This process's rank (0 without a launcher)."""
    return current("ag.rank()").rank


def size() -> int:
    """The number of ranks (1 without a launcher)."""
    return current("ag.size()").size


def local_rank() -> int:
    """This rank's index among the ranks on its host."""
    return current("ag.local_rank()").local_rank


def is_master() -> bool:
    """True on the master rank of a centralized job (rank 0; it never trains)."""
    return current("ag.is_master()").is_master


def is_main_worker() -> bool:
    """True on exactly one training process: the one that prints, logs and saves (in
    every mode the worker with :func:`worker_index` 0: rank 0, or rank 1 in a
    centralized job, whose rank 0 is the master). Use it where a Horovod or DDP script
    says ``if rank == 0``; it answers after ``finish()`` too."""
    return current("ag.is_main_worker()").is_main_worker


def num_workers() -> int:
    """How many ranks train (centralized: all but the master)."""
    return current("ag.num_workers()").n_workers


def worker_index() -> int:
    """This rank's index among the training ranks, 0..num_workers()-1: shard your data
    by it (``DistributedSampler(ds, num_workers(), worker_index())``)."""
    return current("ag.worker_index()").worker_index


def device() -> torch.device:
    """This rank's device: with CUDA present (and ``init(device="auto")``), a worker's
    ``cuda:(i mod n_gpus)``, ``i`` its index among the training ranks on its host (the
    centralized master, rank 0, is not one: it stays on the CPU); else the CPU."""
    return current("ag.device()").device


def crashed() -> bool:
    """An uncaught exception is on its way out (no ``finish()`` at exit then)."""
    return _crashed


def reset(keep: bool = False) -> None:
    """Forget the session (tests); ``keep`` (``finish()``): the queries and collectives
    still answer from it, and a new :func:`init` may start."""
    global _session, _finished
    _finished = _session if keep else None
    _session = None
