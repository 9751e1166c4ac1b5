"""Test-set evaluation of a flat state vector with the task's loss and metric."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .flat import flatten

_DURING = -1  # "the evaluator's own limit": an evaluation during the run


class Evaluator:
    """Loads a state vector ``[params | buffers]`` into a private copy of the task's model
    (in eval mode: BatchNorm uses the running statistics, dropout is off) and scores the
    test set: ``(mean test loss, metric)``. The metric sees every test output and target
    at once (concatenated over batches).

    ``during``: the evaluations during the run score only the first ``during`` test
    samples (a fixed subset, so that many evaluation points stay cheap); the runner
    scores the final model on the whole test set (:func:`rescore_final`)."""

    def __init__(self, task: Any, data: Any, device: torch.device | str = "cpu",
                 batch_size: int = 1000, during: int | None = None) -> None:
        self.device = torch.device(device)
        self.model = task.build_model().to(self.device)
        self.flat = flatten(self.model, self.device, who=f"model {task.model_name}")
        self.loss_fn = task.loss_fn()
        self.metric = task.metric_obj()
        self.data = data
        self.batch_size = batch_size
        self.test_size = data.test_size()
        self.during = during if during else None
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
    def __call__(self, state: Tensor, limit: int | None = _DURING) -> tuple[float, float]:
        """(mean loss, metric) of ``state`` on the test set, or its first ``limit``
        samples (by default the evaluator's ``during``; ``None``: all of it)."""
        if limit == _DURING:
            limit = self.during
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


def rescore_final(result: Any, task: Any, data: Any, device: torch.device | str,
                  during: int) -> None:
    """With ``eval_samples`` (``during``) set, the evaluations of a run scored a subset:
    score its final model on the whole test set, in its last record (or a new one when
    the last record is of an earlier model); every record says how many samples it
    scored (``extra["eval_samples"]``)."""
    if not during or result.final_params is None or not result.evals:
        return
    for rec in result.evals:
        rec.extra.setdefault("eval_samples", min(during, data.test_size()))
    loss, metric = Evaluator(task, data, device)(result.final_params, limit=None)
    last = result.evals[-1]
    if last.updates != result.updates:
        from dataclasses import replace

        last = replace(last, updates=result.updates, samples=result.samples,
                       wall_time=result.wall_time, extra={})
        result.evals.append(last)
    last.test_loss, last.test_metric = loss, metric
    last.extra["eval_samples"] = data.test_size()
