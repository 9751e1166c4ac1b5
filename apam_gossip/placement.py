"""Where each process of a run goes: its device, its torch threads, and under MPI how many
ranks train and which share a host. One home for what every runtime derives (the
shared-memory and MPI runtimes, the sequential run, the loop API, ``compare`` and
``bench``).

Conventions: worker ``i`` of a host uses ``cuda:(i mod n_gpus)`` when CUDA is wanted and
present; the processes that compute on a host share its cores evenly (at least one
thread each); models are scored on the first GPU or the CPU; under MPI a centralized job's
rank 0 is the master, so it has ``size - 1`` workers (every other mode: ``size``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .config import RunConfig


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, as Slurm and taskset set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(cfg: RunConfig, n_procs: int) -> int:
    """Torch threads for each of ``n_procs`` computing processes: a fair share of the cores
    (``cfg.threads_per_worker`` when set)."""
    if cfg.threads_per_worker is not None:
        return cfg.threads_per_worker
    return max(1, available_cores() // n_procs)


def device_for(cfg: RunConfig, worker: int) -> torch.device:
    """cuda:(worker mod n_gpus) when CUDA is wanted and present, else the CPU."""
    if cfg.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", worker % torch.cuda.device_count())
    return torch.device("cpu")


def master_device(cfg: RunConfig) -> torch.device:
    """Where APAM's master keeps its model and optimizer state: cuda:0 when asked for
    (``master_device = "cuda"``, or ``"auto"`` with GPU workers) and present, else the
    CPU. An update costs a few elementwise passes over the model: on a GPU well under a
    millisecond for 11M parameters, where the CPU took 85 ms (issue 21)."""
    want = cfg.master_device if cfg.master_device != "auto" else \
        ("cpu" if cfg.device == "cpu" else "cuda")
    return torch.device("cuda", 0) if want == "cuda" and torch.cuda.is_available() \
        else torch.device("cpu")


def eval_device(cfg: RunConfig) -> torch.device:
    """Where the coordinator (or rank 0) scores models: the first GPU if wanted and
    present, else the CPU."""
    return torch.device("cuda", 0) if cfg.device != "cpu" and torch.cuda.is_available() \
        else torch.device("cpu")


def mpi_masters(cfg: RunConfig) -> int:
    """How many ranks are the master under mpirun: ``master_shards`` for centralized
    (ranks 0..K-1), 1 for syncps, else none."""
    return cfg.master_shards if cfg.mode == "centralized" else int(cfg.mode == "syncps")


def mpi_workers(masters: int, size: int) -> int:
    """How many of ``size`` ranks train: all but the ``masters`` first (a bool: the master
    on rank 0 or none)."""
    return size - int(masters)


def node_placement(comm: Any, masters: int = 1) -> tuple[int, int, int]:
    """(this rank's index among the ranks on its host, how many ranks share the host,
    how many of them are among the ``masters`` first ranks): for cuda:(the index among
    the host's workers mod n_gpus) and for each rank's share of the host's cores.
    Collective."""
    from mpi4py import MPI  # here: importing mpi4py initializes MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        ranks = node.allgather(comm.Get_rank())
        return node.Get_rank(), node.Get_size(), sum(r < masters for r in ranks)
    finally:
        node.Free()


__all__ = ["available_cores", "threads_per_worker", "device_for", "master_device", "eval_device",
           "mpi_masters",
           "mpi_workers", "node_placement"]
