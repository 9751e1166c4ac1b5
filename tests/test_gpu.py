"""GPU tier (``pytest -m gpu``): the device paths of issue 21 on a real GPU. Every test is
skipped on a machine without CUDA (CI has none); ``benchmarks/gpu_check.sh`` runs this
tier on the GPU machine beside the throughput table.

What is checked: CUDA rows shared with a spawned process (CUDA IPC) see each other's
writes; gossip on GPU workers keeps the audit (no local step lost to an average on the
device, with the average on its own stream or inline); a 1-worker APAM run with the
master on the GPU equals the sequential run on the GPU; the all-reduce baseline trains
with its slots on the GPU; a killed GPU worker leaves the others training; under mpirun,
gossip and APAM with GPU ranks.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys

import pytest
import torch

from apam_gossip.mpirun import run_mpirun
from apam_gossip.procs import CTX
from apam_gossip.runner import run
from apam_gossip.transport.rows import Rows, fence

from helpers import make_cfg

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BASE = {"device": "cuda", "data": {"batch_size": 32}, "evals": 2, "optim": {"lr": 2e-3}}


def _child_averages(rows: Rows) -> None:
    from apam_gossip.average import average_pair_

    stream = torch.cuda.Stream(rows[0].device)
    with torch.cuda.stream(stream):  # as the gossip thread does: its own stream
        average_pair_(rows[0], rows[1])
        fence(rows[0], rows[1])


def test_cuda_rows_are_shared_with_a_spawned_process():
    rows = Rows(2, 1000, devices=["cuda:0", "cuda:0"])
    assert rows.on_gpu and rows[0].is_cuda
    rows.copy_(torch.stack([torch.zeros(1000), torch.full((1000,), 2.0)]))
    p = CTX.Process(target=_child_averages, args=(rows,))
    p.start()
    p.join(120)
    assert p.exitcode == 0
    assert rows.clone().eq(1.0).all()  # the child's average, seen here


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_rows_on_two_gpus_are_averaged_from_a_spawned_process():
    """The cross-device average (two workers on different GPUs): the copy between the
    devices runs on the source's stream and the fence waits on both."""
    rows = Rows(2, 1000, devices=["cuda:0", "cuda:1"])
    rows.copy_(torch.stack([torch.zeros(1000), torch.full((1000,), 2.0)]))
    p = CTX.Process(target=_child_averages, args=(rows,))
    p.start()
    p.join(120)
    assert p.exitcode == 0
    assert rows.clone().eq(1.0).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gossip_with_workers_on_two_gpus_keeps_the_audit(digits):
    r = run(make_cfg(BASE, mode="decentralized", workers=4, topology="complete", steps=200,
                     audit=True), dataset=digits)
    assert {w.device for w in r.workers} == {"cuda:0", "cuda:1"}
    assert r.evals[-1].extra["audit_error"] <= 1e-5, r.evals[-1].extra


@pytest.mark.parametrize("overlap", [True, False])
def test_gossip_on_gpu_workers_keeps_the_audit(digits, overlap):
    r = run(make_cfg(BASE, mode="decentralized", workers=4, topology="complete", steps=400,
                     audit=True, overlap=overlap, adaptive_state="tracked"), dataset=digits)
    assert all(w.device.startswith("cuda") for w in r.workers)
    assert r.evals[-1].extra["audit_error"] <= 1e-5, r.evals[-1].extra
    assert r.evals[-1].extra["audit_u_error"] <= 1e-5, r.evals[-1].extra
    assert r.final_accuracy > 0.8


def test_a_users_loss_that_comes_back_on_the_cpu_is_accepted(digits):
    r = run(make_cfg(BASE, mode="decentralized", workers=2, steps=60,
                     loss="user_models:loss_on_the_cpu"), dataset=digits)
    assert r.updates == 60 and r.evals[-1].train_loss is not None


def test_one_worker_apam_with_the_master_on_the_gpu_equals_the_sequential_run(digits):
    cen = run(make_cfg(BASE, mode="centralized", workers=1, steps=150,
                       master_device="cuda"), dataset=digits)
    seq = run(make_cfg(BASE, mode="sequential", workers=1, steps=150), dataset=digits)
    assert cen.config["master_device"] == "cuda" and cen.staleness == {0: 150}
    assert cen.provenance["master_device"] == "cuda:0"
    diff = (cen.final_params - seq.final_params).abs().max().item()
    assert diff <= 1e-5, f"APAM (1 worker, GPU master) drifted from sequential by {diff}"


@pytest.mark.parametrize("mode", ["centralized", "allreduce"])
def test_gpu_workers_train_in_the_other_modes(digits, mode):
    r = run(make_cfg(BASE, mode=mode, workers=4, steps=300), dataset=digits)
    assert r.final_accuracy > 0.8 and all(w.device.startswith("cuda") for w in r.workers)


class _KillAt:
    def __init__(self, name: str, fraction: float) -> None:
        self.name, self.fraction, self.done = name, fraction, False

    def __call__(self, ev) -> None:
        if self.done or not ev.total_samples or ev.samples < self.fraction * ev.total_samples:
            return
        for p in multiprocessing.active_children():
            if p.name == self.name:
                os.kill(p.pid, signal.SIGKILL)
                self.done = True


@pytest.mark.parametrize("mode", ["centralized", "decentralized"])
def test_a_killed_gpu_worker_leaves_the_others_training(digits, mode):
    kill = _KillAt("worker 2", 0.3)
    r = run(make_cfg(BASE, mode=mode, workers=4, steps=1200, slowdown=[2] * 4),
            dataset=digits, callback=kill)
    assert kill.done and r.failed_workers == [2]
    assert r.final_accuracy > 0.8


MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")
MPI_ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "PYTHONUNBUFFERED": "1"}


@pytest.mark.skipif(not os.path.exists(MPIRUN), reason="mpirun not in the venv")
@pytest.mark.parametrize("mode", ["centralized", "decentralized"])
def test_gpu_ranks_under_mpirun(tmp_path, mode):
    out = tmp_path / "r.json"
    argv = [sys.executable, "-m", "apam_gossip", "train", "-q", "--mode", mode,
            "--device", "cuda", "--epochs", "8", "--lr", "2e-3", "--evals", "1", "-o", str(out)]
    p = run_mpirun(3, argv, timeout=240, env=MPI_ENV)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["transport"] == "mpi" and r["final_accuracy"] > 0.8
    assert all(w["device"].startswith("cuda") for w in r["workers"])


@pytest.mark.skipif(not os.path.exists(MPIRUN), reason="mpirun not in the venv")
@pytest.mark.parametrize("example,n", [("loop_decentralized", 4), ("loop_centralized", 3)])
def test_the_loop_api_examples_on_gpu_ranks(tmp_path, example, n):
    """A user's own loop with ag.device() a GPU: gossip keeps its state on the GPU, APAM's
    workers send GPU gradients."""
    res = tmp_path / "r.json"
    argv = [sys.executable, f"examples/{example}.py", "--epochs", "4", "--result", str(res)]
    p = run_mpirun(n, argv, timeout=240, env=MPI_ENV)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    d = json.loads(res.read_text())
    assert d["final_accuracy"] >= 0.8, d["evals"]
    assert all(w["device"].startswith("cuda") for w in d["workers"]), d["workers"]
