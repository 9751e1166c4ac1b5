"""RunResult: the one result type every mode and transport returns.

Wall times are seconds since training started (after every process was up and had its
data), so process start-up and imports are not counted. ``samples`` counts training
samples whose gradients were applied to the model that was evaluated.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .files import atomic_write_text


@dataclass
class EvalRecord:
    """One evaluation of the model during a run."""

    wall_time: float
    samples: int
    updates: int
    train_loss: float | None
    test_loss: float
    test_acc: float
    extra: dict[str, float] = field(default_factory=dict)


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
    staleness: dict[int, int]
    workers: list[WorkerStats]
    final_params: torch.Tensor | None = None
    failed_workers: list[int] = field(default_factory=list)  # died mid-run; run went on

    @property
    def final_accuracy(self) -> float:
        return self.evals[-1].test_acc if self.evals else float("nan")

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_time if self.wall_time > 0 else 0.0

    def time_to_accuracy(self, target: float) -> float | None:
        """Wall time of the first evaluation at or above ``target``, else None."""
        for e in self.evals:
            if e.test_acc >= target:
                return e.wall_time
        return None

    def staleness_mean(self) -> float:
        n = sum(self.staleness.values())
        return sum(k * c for k, c in self.staleness.items()) / n if n else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("final_params")
        d["staleness"] = {str(k): v for k, v in sorted(self.staleness.items())}
        d["final_accuracy"] = self.final_accuracy
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
        for k in ("final_accuracy", "samples_per_s", "staleness_mean"):
            d.pop(k, None)
        d["evals"] = [EvalRecord(**e) for e in d["evals"]]
        d["workers"] = [WorkerStats(**w) for w in d["workers"]]
        d["staleness"] = {int(k): v for k, v in d["staleness"].items()}
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> RunResult:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read run result {path}: {e}") from None
