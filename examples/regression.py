"""A regression on a real dataset (scikit-learn's diabetes data: 442 patients, 10
features, a disease-progression score), with a user's model, the MSE loss and an error
metric (MAE, lower is better), compared across modes.

    python examples/regression.py [--tiny]

The same from the command line (from the repository root), naming the functions below
by import string:

    apam-gossip compare --model examples.regression:make_model \\
        --data examples.regression:make_datasets --loss mse --metric mae --target 0.6 \\
        --workers 4 --epochs 60 --modes centralized,decentralized,allreduce,sequential
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import TensorDataset

from apam_gossip import RunConfig
from apam_gossip.compare import compare, comparison_table


def make_datasets() -> tuple[TensorDataset, TensorDataset]:
    """Diabetes, standardized with the training split's statistics, split 80/20."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.float32)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    tr, te = order[:cut], order[cut:]
    mx, sx = x[tr].mean(0), x[tr].std(0)
    my, sy = y[tr].mean(), y[tr].std()
    norm = lambda idx: TensorDataset((x[idx] - mx) / sx, (y[idx] - my) / sy)  # noqa: E731
    return norm(tr), norm(te)


def make_model() -> nn.Module:
    """A small MLP regressor: 10 features -> 1 score."""
    return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 1))


def main(argv: list[str] | None = None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="fewer epochs")
    p.add_argument("--target", type=float, default=0.6, help="the MAE to reach")
    a = p.parse_args(argv)
    cfg = RunConfig.from_dict({
        "workers": 4, "epochs": 15 if a.tiny else 60, "evals": 6, "topology": "ring",
        "loss": "mse", "metric": "mae", "data": {"batch_size": 16},
        "optim": {"lr": 3e-3}})
    train, test = make_datasets()
    results = compare(cfg, ["centralized", "decentralized", "allreduce", "sequential"],
                      model=make_model, train_data=train, test_data=test)
    print(comparison_table(results, a.target))
    return results


if __name__ == "__main__":
    main()
