"""The loop API under torchrun (issue 22, item 4): the all-reduce mode and the collectives
on torch.distributed (gloo), with the same results as under `apam-gossip launch`; the
asynchronous modes refused in one line. Real torchrun jobs, each with a timeout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apam_gossip.mpirun import mpi_env

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
MPIRUN = Path(sys.executable).parent / "mpirun"
ENV = {**mpi_env(), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def torchrun(n: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, "--nproc-per-node", str(n), *args],
                          capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def launch(n: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apam_gossip", "launch", "-np", str(n),
                           "--timeout", str(timeout - 20), *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV, cwd=ROOT)


@pytest.mark.skipif(not MPIRUN.exists(), reason="mpirun not in the venv")
@pytest.mark.parametrize("n", [2, 4])
def test_torchrun_and_launch_run_the_same_script_to_the_same_model(tmp_path, n):
    """The DDP-shaped example (Adadelta, StepLR) in allreduce mode: the same printed
    metrics and the same final model from either launcher; to the bit on 2 processes (a
    sum of two is the same in any order), to float32 rounding on 4 (gloo and MPI add in
    different orders)."""
    out = {}
    for how, runner in (("torchrun", torchrun), ("launch", launch)):
        model = tmp_path / f"{how}.pt"
        p = runner(n, "examples/port_ddp.py", "--mode", "allreduce", "--epochs", "1",
                   "--save-model", str(model))
        assert p.returncode == 0, p.stdout + p.stderr
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("allreduce: test")]
        assert len(line) == 1, p.stdout
        out[how] = (line[0], torch.load(model))
    assert out["torchrun"][0] == out["launch"][0]
    for k, v in out["torchrun"][1].items():
        diff = float((v - out["launch"][1][k]).abs().max())
        assert diff == 0.0 if n == 2 else diff <= 1e-5, (k, diff)


def test_collectives_and_the_rank_habits_under_torchrun(tmp_path):
    p = torchrun(3, "tests/mpi_scripts/collectives.py", "allreduce", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    seen = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(3)]
    assert [s["main"] for s in seen] == [True, False, False]
    for s in seen:
        a = s["after"]
        assert s["mid_sum"] == 6 and a["avg"] == 1.0 and a["max"] == 2
        assert a["tensor"] == [1.0] * 3 and a["bcast"] == {"from": 2, "list": [1, 2]}


def test_a_wrapped_optimizer_under_torchrun_follows_the_plain_loop(tmp_path):
    subprocess.run([sys.executable, "tests/mpi_scripts/wrapped.py", "allreduce",
                    str(tmp_path), "--plain"], check=True, timeout=60, env=ENV, cwd=ROOT)
    p = torchrun(2, "tests/mpi_scripts/wrapped.py", "allreduce", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    plain = torch.load(tmp_path / "plain.pt")
    for i in range(2):
        w = torch.load(tmp_path / f"worker{i}.pt")
        assert float((w["flat"] - plain["flat"]).abs().max()) <= 1e-6


@pytest.mark.parametrize("mode", ["decentralized", "centralized"])
def test_the_asynchronous_modes_under_torchrun_are_one_line(mode):
    p = torchrun(2, "tests/loop_script.py", "--mode", mode, "--steps", "5", timeout=120)
    assert p.returncode != 0
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("apam-gossip: error:")]
    assert len(errors) == 1, p.stderr  # printed once, by rank 0
    assert f"mode '{mode}' needs MPI" in errors[0] and "apam-gossip launch -np N" in errors[0]
    # torchrun's agent prints its own traceback of the failed child; none of ours
    assert "LoopError" not in p.stderr and "apam_gossip/loop" not in p.stderr


def test_train_under_torchrun_with_several_processes_is_one_line_not_n_jobs(tmp_path):
    out = tmp_path / "r.json"
    p = torchrun(2, "-m", "apam_gossip", "train", "--steps", "5", "-o", str(out),
                 timeout=120)
    assert p.returncode != 0 and not out.exists()
    assert "started by torchrun with several processes: each would run the whole job" \
        in p.stderr
