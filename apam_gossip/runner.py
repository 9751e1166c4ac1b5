"""``run(config) -> RunResult``: the single entry point that drives every mode.

On one machine the calling process is the coordinator: it loads the data once (into
shared memory, so workers do not each hold a copy), starts the processes of the chosen
mode (:mod:`apam_gossip.runtime.shm`), and :class:`~apam_gossip.coordinator.Coordinator`
runs them to the end, always reaping them, also on errors, Ctrl-C and timeouts. Under
``mpirun`` every rank calls :func:`run` and :mod:`apam_gossip.runtime.mpi` takes over.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from .checkpoint import load_checkpoint
from .config import ConfigError, RunConfig
from .coordinator import RunInterrupted, RunTimeout
from .core.sync import split_batch
from .data import Dataset, UserData, check_augment, load_data
from .evaluate import rescore_final
from .placement import eval_device
from .plan import topology_of
from .progress import ProgressPrinter
from .reporting import Callback, Event, no_callback, with_task
from .result import RunResult
from .runlog import MetricsLog, as_specs
from .runtime.mpi import run_mpi
from .runtime.sequential import run_sequential
from .runtime.shm import CentralizedMode, DecentralizedMode, SyncMode, SyncPsMode, run_mode
from .task import make_task
from .transport.mpi import launched_by_mpi, world


def run(config: RunConfig | None = None, *, model: Any = None, train_data: Any = None,
        test_data: Any = None, loss: Any = None, metric: Any = None,
        dataset: Dataset | UserData | None = None, callback: Callback | None = None,
        resume: str | None = None, quiet: bool = False,
        log: str | Sequence[str] | None = None) -> RunResult | None:
    """Train as ``config`` says and return the :class:`RunResult`.

    A user's own work (see :mod:`apam_gossip.task`): ``model`` a zero-argument callable
    returning an ``nn.Module`` (or an import string), ``train_data``/``test_data`` any
    map-style ``torch.utils.data.Dataset``, ``loss(output, target) -> scalar``,
    ``metric`` a :class:`~apam_gossip.task.Metric` or ``metric(outputs, targets) ->
    float``. Each replaces what the config names (``config.model``, ``config.data.dataset``,
    ``config.loss``, ``config.metric``: built-in names or import strings).

    Under ``mpirun`` (``transport`` ``auto`` or ``mpi``) every rank calls this with the
    same arguments; rank 0 returns the RunResult and the other ranks return None.

    ``dataset`` skips loading (tests, repeated runs). Progress is shown as the command
    line shows it (on rank 0 under MPI) unless ``quiet``; a ``callback`` receives the
    :class:`~apam_gossip.reporting.Event` s instead. ``log``: metric sinks written as the
    run goes, ``"tensorboard:DIR"`` or ``"jsonl:PATH"`` or a list of them (see
    :mod:`apam_gossip.runlog`). ``resume``: a
    checkpoint written by ``config.checkpoint``; the run continues from it with the
    checkpoint's config (``config`` may then be None). SIGTERM or SIGINT during an
    asynchronous run makes it checkpoint (with ``config.checkpoint``) and stop:
    :class:`RunInterrupted`.
    """
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        config = RunConfig.from_dict(ckpt["config"])
    if config is None:
        config = RunConfig()
    check_runnable(config, topology=False)
    if config.workers > MAX_REAL_WORKERS:
        raise ConfigError(f"workers ({config.workers}) is more than a real run takes "
                          f"({MAX_REAL_WORKERS}); `apam-gossip simulate` takes up to 100000")
    data = dataset if dataset is not None else load_data(config, train_data, test_data)
    data = data.subset(config.data.train_limit, config.data.test_limit)
    check_augment(data, config.data.augment)
    if config.workers > data.train_size():
        raise ConfigError(f"workers ({config.workers}) exceeds the {data.train_size()} "
                          "training samples")
    task = make_task(config, data, model=model, loss=loss, metric=metric)
    mpi = resolve_transport(config) == "mpi"
    shows = not mpi or world()[1] == 0  # rank 0 scores and reports under MPI
    metric_name = task.metric_obj().name
    printer = ProgressPrinter(quiet=quiet or not shows, metric=metric_name) \
        if callback is None else None
    metrics = MetricsLog(as_specs(log) if shows else [], metric_name)
    user_cb = callback or printer or no_callback

    def cb(ev: Event) -> None:
        user_cb(ev)
        metrics(ev)

    old_threads = torch.get_num_threads()
    result = None
    try:
        if mpi:
            result = run_mpi(config, task, data, cb, ckpt)
        elif config.mode == "sequential":
            result = run_sequential(config, task, data, cb)
        else:
            mode: Any
            if config.mode == "centralized":
                mode = CentralizedMode(config, task, data, cb, ckpt)
            elif config.mode == "decentralized":
                mode = DecentralizedMode(config, task, data, cb, ckpt)
            elif config.mode == "syncps":
                mode = SyncPsMode(config, task, data, cb)
            else:
                mode = SyncMode(config, task, data, cb)
            run_mode(mode, config.timeout_s)
            result = mode.result()
        if result is not None:
            rescore_final(result, task, data, eval_device(config), config.eval_samples)
            result = with_task(result, task)
    finally:
        torch.set_num_threads(old_threads)
        if printer is not None:
            printer.close()
        metrics.end(result)
    return result


MAX_REAL_WORKERS = 4096


def check_runnable(cfg: RunConfig, topology: bool = True) -> None:
    """Raise the :class:`ConfigError` a run of ``cfg`` would raise at its start, without
    starting it (``compare`` and ``bench`` check every mode before the first run)."""
    cfg.validate()
    if not launched_by_mpi() and _torchrun_world() > 1:
        raise ConfigError("started by torchrun with several processes: each would run the "
                          "whole job on its own. Start `apam-gossip train` once (it starts "
                          "its workers), or under mpirun/srun across hosts; a torchrun "
                          "script uses the loop API (apam_gossip.init)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was requested but torch.cuda.is_available() is False; "
                          "use --device auto or cpu")
    if cfg.mode in ("centralized", "syncps") and cfg.master_device == "cuda" \
            and not torch.cuda.is_available():
        raise ConfigError("master_device cuda was requested but torch.cuda.is_available() "
                          "is False; use --master-device auto or cpu")
    transport = resolve_transport(cfg)
    if cfg.mode == "syncps" and transport != "mpi":  # under mpirun: once the ranks are known
        split_batch(cfg.data.batch_size, cfg.workers)
    if topology and cfg.mode in ("decentralized", "dpsgd") and transport != "mpi":
        topology_of(cfg)


def _torchrun_world() -> int:
    """WORLD_SIZE of a torchrun (or PyTorchJob) process, else 1."""
    from .loop.torchcomm import launched_by_torchrun

    try:
        return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1
    except ValueError:
        return 1


def resolve_transport(cfg: RunConfig) -> str:
    """``shm`` or ``mpi``: ``auto`` picks MPI when started by mpirun with more than one rank."""
    if cfg.transport == "mpi":
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            raise ConfigError("transport mpi needs mpi4py: pip install 'apam_gossip[mpi]'") \
                from None
        return "mpi"
    if launched_by_mpi():
        size = world()[2]
        if size > 1 and cfg.transport == "shm":
            raise ConfigError(f"transport shm under mpirun with {size} ranks would start "
                              f"{size} separate runs; use --transport auto or mpi, or run "
                              "without mpirun")
        return "mpi" if size > 1 else "shm"
    return "shm"


__all__ = ["run", "check_runnable", "resolve_transport", "RunTimeout", "RunInterrupted",
           "Event", "Callback"]
