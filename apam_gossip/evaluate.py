"""Test-set evaluation of a flat parameter vector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import Dataset
from .flat import flatten
from .models import build_model


class Evaluator:
    """Loads a flat parameter vector into a private model and scores the test set."""

    def __init__(self, model_name: str, dataset: Dataset, device: torch.device | str = "cpu",
                 batch_size: int = 1000) -> None:
        self.device = torch.device(device)
        self.model = build_model(model_name, dataset.in_shape, dataset.n_classes).to(self.device)
        self.flat = flatten(self.model, self.device)
        self.x = dataset.x_test.to(self.device)
        self.y = dataset.y_test.to(self.device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, params: Tensor, limit: int | None = None) -> tuple[float, float]:
        """(mean cross-entropy, accuracy in [0, 1]) of ``params`` on the test set, or on
        its first ``limit`` samples."""
        self.flat.params.copy_(params)
        self.model.eval()
        n = len(self.y) if limit is None else min(limit, len(self.y))
        loss_sum, correct = 0.0, 0
        for i in range(0, n, self.batch_size):
            j = min(i + self.batch_size, n)
            out = self.model(self.x[i:j])
            y = self.y[i:j]
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
        return loss_sum / n, correct / n
