"""RunResult: the one result type every mode and transport returns.

Wall times are seconds since training started (after every process was up and had its
data), so process start-up and imports are not counted. ``samples`` counts training
samples whose gradients were applied to the model that was evaluated.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .files import atomic_write_text

if TYPE_CHECKING:
    import torch


@dataclass
class EvalRecord:
    """One evaluation of the model during a run: the task's loss and metric on the test
    set (``test_metric``; accuracy by default)."""

    wall_time: float
    samples: int
    updates: int
    train_loss: float | None
    test_loss: float
    test_metric: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def test_acc(self) -> float:
        """The metric under its default name (accuracy unless the task says otherwise)."""
        return self.test_metric


@dataclass
class WorkerStats:
    """What one worker did: its applied updates and its own timing."""

    worker: int
    device: str
    slowdown: float
    updates: int  # gradients of this worker that were applied
    samples: int
    samples_per_s: float  # applied samples per second of the whole run
    compute_s: float  # time spent computing gradients (excluding injected sleep)
    sleep_s: float  # injected slowdown
    # gossip: whether its averages ran beside its gradients (measured, unless --overlap or
    # --no-overlap forced it; False for a run that never overlapped (shorter than the
    # probe's warm-up); None where no choice was made: other modes, a run that ended
    # mid-probe, results written before it was recorded)
    overlap: bool | None = None
    # the measurement behind a measured choice: median step seconds each way
    overlap_probe: dict[str, float] | None = None
    # gossip: how many averages it began with each neighbour (the chosen distribution)
    neighbours: dict[str, int] | None = None

    @classmethod
    def of(cls, worker: int, device: str, slowdown: float, updates: int, samples: int,
           wall: float, compute_s: float, sleep_s: float = 0.0) -> WorkerStats:
        """The one way every runtime builds them: ``samples_per_s`` over the run's
        ``wall`` seconds (0 for a run of no time)."""
        return cls(worker, device, slowdown, updates, samples,
                   samples / wall if wall > 0 else 0.0, compute_s, sleep_s)


@dataclass
class RunResult:
    """The outcome of :func:`apam_gossip.run`; ``to_json``/``save`` drop ``final_params``."""

    config: dict[str, Any]
    mode: str
    transport: str
    n_params: int
    wall_time: float
    updates: int
    samples: int
    evals: list[EvalRecord]
    # updates per staleness; shared-memory gossip counts into 256 bins, so there key 255
    # counts every staleness of 255 or more (gossip's rarely passes a few dozen)
    staleness: dict[int, int]
    workers: list[WorkerStats]
    final_params: torch.Tensor | None = None  # the final model state [params | buffers]
    failed_workers: list[int] = field(default_factory=list)  # died mid-run; run went on
    # the task: its metric, which way it improves, and what was trained with what
    metric: str = "accuracy"
    higher_is_better: bool = True
    task: dict[str, Any] = field(default_factory=dict)
    # set for a simulated run (apam_gossip.sim): how it was simulated; wall times are
    # then virtual seconds
    simulation: dict[str, Any] | None = None
    # where and how it ran: versions, host, command line, when the training started
    # (see provenance()); empty in results written before it was recorded
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, config: dict[str, Any], mode: str, transport: str, n_params: int,
           wall: float, updates: int, evals: list[EvalRecord], staleness: dict[int, int],
           workers: list[WorkerStats], final_params: torch.Tensor | None, *,
           samples: int | None = None, failed: Any = (), **more: Any) -> RunResult:
        """The one way every runtime builds a result: ``samples`` defaults to the
        workers' sum, ``failed`` is sorted; ``more``: the metric, task or simulation
        fields."""
        more.setdefault("provenance", provenance(wall))
        return cls(config=config, mode=mode, transport=transport, n_params=n_params,
                   wall_time=wall, updates=updates,
                   samples=sum(w.samples for w in workers) if samples is None else samples,
                   evals=evals, staleness=staleness, workers=workers,
                   final_params=final_params, failed_workers=sorted(failed), **more)

    @property
    def simulated(self) -> bool:
        return self.simulation is not None

    @property
    def final_metric(self) -> float:
        return self.evals[-1].test_metric if self.evals else float("nan")

    @property
    def final_accuracy(self) -> float:
        """The final metric when it is accuracy (the default), else NaN."""
        return self.final_metric if self.metric == "accuracy" else float("nan")

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_time if self.wall_time > 0 else 0.0

    def reached(self, value: float, target: float) -> bool:
        """``value`` of the metric is at ``target`` or better."""
        return value >= target if self.higher_is_better else value <= target

    def first_reaching(self, target: float) -> EvalRecord | None:
        """The first evaluation whose metric reached ``target``, else None."""
        return next((e for e in self.evals if self.reached(e.test_metric, target)), None)

    def time_to_target(self, target: float) -> float | None:
        """Wall time of the first evaluation that reached ``target``, else None."""
        e = self.first_reaching(target)
        return e.wall_time if e is not None else None

    def time_to_accuracy(self, target: float) -> float | None:
        return self.time_to_target(target)

    def staleness_mean(self) -> float:
        n = sum(self.staleness.values())
        return sum(k * c for k, c in self.staleness.items()) / n if n else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("final_params")
        d["staleness"] = {str(k): v for k, v in sorted(self.staleness.items())}
        d["final_metric"] = self.final_metric
        if self.metric == "accuracy":  # the names results had before metrics were chosen
            d["final_accuracy"] = self.final_metric
            for e in d["evals"]:
                e["test_acc"] = e["test_metric"]
        d["samples_per_s"] = self.samples_per_s
        d["staleness_mean"] = self.staleness_mean()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        """Write the JSON atomically (temp file + rename): never a half-written file."""
        atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        d = dict(d)
        for k in ("final_accuracy", "final_metric", "samples_per_s", "staleness_mean"):
            d.pop(k, None)
        evals = []
        for e in d["evals"]:
            e = dict(e)
            metric = e.pop("test_acc", None)  # written by older versions, or an alias
            e.setdefault("test_metric", metric)
            evals.append(EvalRecord(**e))
        d["evals"] = evals
        d["workers"] = [WorkerStats(**w) for w in d["workers"]]
        d["staleness"] = {int(k): v for k, v in d["staleness"].items()}
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> RunResult:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read run result {path}: {e}") from None


def provenance(wall: float = 0.0) -> dict[str, Any]:
    """Where and how a run ran, for a result read months later: the versions of Python,
    apam_gossip, torch, numpy (and mpi4py and MPI when MPI is in use), the host, the
    command line, and the UTC time the training started (now minus its ``wall`` seconds;
    a simulated run's wall time is virtual, so its start is when it was simulated)."""
    import datetime
    import platform
    import socket
    import sys

    import numpy as np
    import torch

    from . import __version__

    out: dict[str, Any] = {
        "apam_gossip": __version__, "python": platform.python_version(),
        "torch": torch.__version__, "numpy": np.__version__,
        "host": socket.gethostname(), "argv": list(sys.argv),
    }
    if "mpi4py" in sys.modules:
        mpi4py = sys.modules["mpi4py"]
        out["mpi4py"] = getattr(mpi4py, "__version__", "?")
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized():
            out["mpi"] = mpi.Get_library_version().splitlines()[0].strip()
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0)
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(
        seconds=wall if 0 < wall < 1e9 else 0.0)
    out["started"] = start.isoformat(timespec="seconds")
    return out


def format_metric(name: str, value: float | None) -> str:
    """A metric value as people read it: accuracy in percent, the others plainly."""
    if value is None or value != value:
        return "-"
    return f"{100 * value:.2f}%" if name == "accuracy" else f"{value:.4g}"


def target_text(name: str, higher_is_better: bool, target: float) -> str:
    """``acc>=90%`` or ``mse<=0.3``: a target and which side of it counts."""
    short = "acc" if name == "accuracy" else name
    return f"{short}{'>=' if higher_is_better else '<='}{format_metric(name, target)}"

