"""A model class from torchvision (ResNet-18, adapted to 1-channel 28x28 images), named
by import string, trained under ``mpirun`` in decentralized mode on a topology file.

    python examples/torchvision_resnet.py [--tiny]     # starts mpirun -n 4 itself

Each rank runs this script; every one resolves the model's import string
``examples.torchvision_resnet:resnet18_1ch`` and the topology file itself. The same from
the command line, from the repository root:

    launch/mpirun.sh -n 4 train --mode decentralized --topology topologies/ring4.edgelist \\
        --model examples.torchvision_resnet:resnet18_1ch --dataset fashion-mnist
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def resnet18_1ch() -> nn.Module:
    """torchvision's ResNet-18 for 10 classes, its stem made for 1x28x28 inputs: a 3x3
    stride-1 first convolution and no max-pool (the 7x7/2 stem would shrink 28x28 to 7x7
    before the first block)."""
    from apam_gossip.data import import_torchvision

    tv = import_torchvision()
    if tv is None:
        raise ImportError("torchvision is not installed: pip install torchvision")
    import torchvision.models

    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a few steps on a few images")
    p.add_argument("--ranks", type=int, default=4)
    a = p.parse_args(argv)
    from apam_gossip.transport.mpi import launched_by_mpi

    if not launched_by_mpi():  # start the job: this script on every rank
        from apam_gossip.mpirun import run_mpirun

        job = run_mpirun(a.ranks, [sys.executable, __file__, *(argv or sys.argv[1:])],
                         capture=False, timeout=3600)
        return job.returncode
    sys.path.insert(0, str(ROOT))  # so the import string resolves on every rank
    from apam_gossip import RunConfig, run

    data = {"dataset": "fashion-mnist", "batch_size": 16}
    if a.tiny:
        data.update(train_limit=640, test_limit=200)
    cfg = RunConfig.from_dict({
        "mode": "decentralized", "model": "examples.torchvision_resnet:resnet18_1ch",
        "topology": str(ROOT / "topologies" / f"ring{a.ranks}.edgelist"),
        "steps": 40 if a.tiny else 3000, "evals": 2, "data": data,
        "optim": {"lr": 1e-3}})
    r = run(cfg)
    if r is not None:  # rank 0
        extra = r.evals[-1].extra
        print(f"decentralized over MPI, {a.ranks} ranks, ResNet-18 ({r.n_params:,} "
              f"parameters): test accuracy {100 * r.final_metric:.2f}% after "
              f"{r.wall_time:.1f} s ({r.samples_per_s:.0f} samples/s); consensus distance "
              f"{extra['consensus_distance']:.2e}, BatchNorm buffers "
              f"{extra.get('buffer_consensus', float('nan')):.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
