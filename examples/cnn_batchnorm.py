"""A user's CNN with BatchNorm and dropout, trained on Fashion-MNIST through ``run()`` in
both asynchronous modes.

    python examples/cnn_batchnorm.py            # 4 workers, 3 epochs per mode
    python examples/cnn_batchnorm.py --tiny     # a quick check (a few thousand images)

The model class lives in this script: ``run(..., model=SmallCNN)`` sends it to the worker
processes by value, so no package is needed. BatchNorm's running statistics are part of
the model's state: the APAM master owns them in centralized mode, gossip averages them
with the parameters in decentralized mode.
"""

from __future__ import annotations

import argparse

from torch import nn

from apam_gossip import RunConfig, run


class SmallCNN(nn.Module):
    """Two conv blocks (conv, BatchNorm, ReLU, pool), dropout, a linear classifier."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * c * 7 * 7, 10))

    def forward(self, x):
        return self.head(self.features(x))


def main(argv: list[str] | None = None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a quick check on 3,000 images")
    p.add_argument("--workers", type=int, default=4)
    a = p.parse_args(argv)
    data = {"dataset": "fashion-mnist", "batch_size": 32}
    if a.tiny:
        data.update(train_limit=3000, test_limit=1000)
    results = []
    for mode, lr in (("centralized", 2e-3), ("decentralized", 4e-3)):
        cfg = RunConfig.from_dict({
            "mode": mode, "workers": a.workers, "epochs": 1 if a.tiny else 3, "evals": 3,
            "topology": "ring", "data": data, "optim": {"lr": lr, "schedule": "cosine"}})
        r = run(cfg, model=SmallCNN)
        extra = r.evals[-1].extra
        line = (f"{mode:>13}: test accuracy {100 * r.final_metric:.2f}% after "
                f"{r.wall_time:.1f} s of training ({r.samples_per_s:.0f} samples/s)")
        if "buffer_consensus" in extra:
            line += (f"; consensus distance: parameters {extra['consensus_distance']:.2e}, "
                     f"BatchNorm buffers {extra['buffer_consensus']:.2e}")
        print(line, flush=True)
        results.append(r)
    return results


if __name__ == "__main__":
    main()
