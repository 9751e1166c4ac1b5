"""What every runner derives from a config and a dataset before any process starts.

The shared-memory runner computes it once in the coordinator; under MPI every rank
computes the same (seeded) plan for itself. Either way there is one definition of the
budget, the evaluation points, the data split, the initial model, the topology and the
data order after a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import networkx as nx
import torch

from .algorithms.common import eval_points
from .config import RunConfig
from .data import partition
from .task import Task
from .topology import (
    make_topology,
    metropolis_hastings_weights,
    neighbor_probabilities,
    validate_topology,
)

RESUME_SEED_STRIDE = 1_000_003


def topology_of(cfg: RunConfig) -> nx.Graph:
    """The validated gossip graph of ``cfg`` (a file or a generator) for its workers."""
    return validate_topology(make_topology(cfg.topology, cfg.workers, seed=cfg.seed),
                             cfg.workers)


def worker_config(cfg: RunConfig, resumes: int) -> RunConfig:
    """The config the workers train with: after a resume they draw a fresh seeded data
    order (the order of an asynchronous run cannot be replayed exactly anyway)."""
    return cfg.replace(seed=cfg.seed + RESUME_SEED_STRIDE * resumes) if resumes else cfg


def total_updates(cfg: RunConfig, n_train: int) -> int:
    """The run's budget in model updates (``steps``, or ``epochs`` passes of the data)."""
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * n_train / cfg.data.batch_size))


@dataclass
class RunPlan:
    """The seeded set-up of a run.

    ``x0``: the initial state ``[params | buffers]`` every worker starts from, of which
    the first ``n_params`` entries are trained. ``total``: the budget in updates
    (gradients); the synchronous modes spend it in ``rounds`` of one gradient per worker.
    ``eval_at``: update counts (rounds for the synchronous modes) at which to evaluate."""

    cfg: RunConfig
    x0: torch.Tensor
    n_params: int
    shards: list[torch.Tensor]
    total: int

    @classmethod
    def of(cls, cfg: RunConfig, data: Any, task: Task, n_shards: int | None = None) -> RunPlan:
        """``n_shards``: split the data that many ways (default: one per worker)."""
        n = data.train_size()
        # labels only where the split needs them (reading a user's dataset costs a pass)
        labels = data.train_labels() if cfg.data.partition == "dirichlet" \
            else torch.zeros(n, dtype=torch.int64)
        shards = partition(labels, n_shards or cfg.workers, cfg.data.partition,
                           cfg.data.dirichlet_alpha, cfg.seed)
        x0, n_params = task.initial_state()
        return cls(cfg, x0, n_params, shards, total_updates(cfg, n))

    @property
    def numel(self) -> int:
        """Length of the state vector (what transports move)."""
        return self.x0.numel()

    @property
    def rounds(self) -> int:
        return max(1, -(-self.total // self.cfg.workers))

    @property
    def synchronous(self) -> bool:
        return self.cfg.mode in ("allreduce", "dpsgd")

    @property
    def total_samples(self) -> int:
        steps = self.rounds * self.cfg.workers if self.synchronous else self.total
        return steps * self.cfg.data.batch_size

    @property
    def eval_at(self) -> list[int]:
        return eval_points(self.rounds if self.synchronous else self.total, self.cfg.evals)

    @cached_property
    def graph(self) -> nx.Graph:
        return topology_of(self.cfg)

    def neighbors(self, i: int) -> tuple[list[int], list[float]]:
        """Gossip: worker ``i``'s neighbors and how often each is picked."""
        return neighbor_probabilities(self.graph)[i]

    def mixing(self, i: int) -> tuple[list[tuple[int, float]] | None, list[int]]:
        """dpsgd: worker ``i``'s Metropolis-Hastings weights (self included) and its
        neighbors; allreduce: (None, [])."""
        if self.cfg.mode != "dpsgd":
            return None, []
        weights = metropolis_hastings_weights(self.graph)[i]
        return weights, [j for j, _ in weights if j != i]
