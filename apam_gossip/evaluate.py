"""Test-set evaluation of a flat state vector with the task's loss and metric."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .flat import flatten


class Evaluator:
    """Loads a state vector ``[params | buffers]`` into a private copy of the task's model
    (in eval mode: BatchNorm uses the running statistics, dropout is off) and scores the
    test set: ``(mean test loss, metric)``. The metric sees every test output and target
    at once (concatenated over batches)."""

    def __init__(self, task: Any, data: Any, device: torch.device | str = "cpu",
                 batch_size: int = 1000) -> None:
        self.device = torch.device(device)
        self.model = task.build_model().to(self.device)
        self.flat = flatten(self.model, self.device, who=f"model {task.model_name}")
        self.loss_fn = task.loss_fn()
        self.metric = task.metric_obj()
        self.data = data
        self.batch_size = batch_size
        self.test_size = data.test_size()
        # the built-in in-memory data: the test set stays on the evaluation device
        self._resident = None
        if hasattr(data, "x_test"):
            self._resident = (data.x_test.to(self.device), data.y_test.to(self.device))

    def _batches(self, limit: int | None):
        if self._resident is None:
            yield from self.data.test_batches(self.batch_size, limit, self.device)
            return
        x, y = self._resident
        n = len(y) if limit is None else min(limit, len(y))
        for i in range(0, n, self.batch_size):
            yield x[i: min(i + self.batch_size, n)], y[i: min(i + self.batch_size, n)]

    @torch.no_grad()
    def __call__(self, state: Tensor, limit: int | None = None) -> tuple[float, float]:
        """(mean loss, metric) of ``state`` on the test set, or its first ``limit``
        samples."""
        self.flat.state.copy_(state)
        self.model.eval()
        outs, ys = [], []
        loss_sum, n = 0.0, 0
        for x, y in self._batches(limit):
            out = self.model(x)
            k = len(y)
            loss_sum += float(self.loss_fn(out, y)) * k
            n += k
            outs.append(out)
            ys.append(y)
        return loss_sum / n, self.metric(torch.cat(outs), torch.cat(ys))
