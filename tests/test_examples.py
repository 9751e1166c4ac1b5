"""The examples, each run as a script at a tiny size (real processes, real data)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from apam_gossip.data import DEBIAN_FASHION_MNIST

ROOT = Path(__file__).parent.parent
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
needs_fmnist = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                                  reason="needs Debian's dataset-fashion-mnist")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
       "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def script(name: str, *args: str, timeout: float = 500) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout, env=ENV)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


@needs_fmnist
def test_cnn_with_batchnorm_on_fashion_mnist_in_both_modes():
    out = script("cnn_batchnorm.py", "--tiny").stdout
    lines = [ln for ln in out.splitlines() if "test accuracy" in ln]
    assert len(lines) == 2 and "centralized" in lines[0] and "decentralized" in lines[1]
    accs = [float(ln.split("test accuracy ")[1].split("%")[0]) for ln in lines]
    assert min(accs) >= 50.0, out  # 3,000 images, one epoch (65-75% seen): chance is 10%
    assert "BatchNorm buffers" in lines[1]


def test_regression_compared_across_modes():
    out = script("regression.py", "--tiny").stdout
    assert "time to mae<=0.6" in out and "final mae" in out
    rows = [ln.split() for ln in out.splitlines()
            if ln.split() and ln.split()[0] in ("centralized", "decentralized", "allreduce",
                                               "sequential")]
    assert len(rows) == 4
    for row in rows:
        assert float(row[4]) < 0.8, out  # the final MAE of a standardized score


@needs_fmnist
def test_torchvision_resnet_under_mpirun_on_a_topology_file():
    mpirun = Path(sys.executable).parent / "mpirun"
    if not mpirun.exists():
        pytest.skip("mpirun not in the venv")
    from apam_gossip.data import import_torchvision

    if import_torchvision() is None:
        pytest.skip("torchvision is not installed")
    out = script("torchvision_resnet.py", "--tiny").stdout
    assert "decentralized over MPI, 4 ranks, ResNet-18" in out, out
    assert "BatchNorm buffers" in out
