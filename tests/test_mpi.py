"""MPI tier: real `mpirun` jobs (oversubscribed on 2 cores), each with a timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
MPIRUN = Path(sys.executable).parent / "mpirun"

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not MPIRUN.exists(), reason="mpirun not in the venv: pip install "
                       "'apam_gossip[mpi]' (launch/setup.sh does)"),
]

ENV = {
    **os.environ,
    "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "self,sm,tcp", "OMPI_MCA_osc": "sm,rdma",
    "PYTHONUNBUFFERED": "1",
}
# TCP only, on loopback: the path ranks on different hosts take
TCP_ENV = {**ENV, "OMPI_MCA_btl": "self,tcp", "OMPI_MCA_btl_tcp_if_include": "lo"}


def mpirun(n: int, *args: str, timeout: float = 180,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """mpirun as the benchmarks start it: a private folder for OpenMPI's shared-memory
    segments, removed after the job; on a timeout the whole job is ended, then raised."""
    from apam_gossip.mpirun import run_mpirun

    return run_mpirun(n, list(args), timeout=timeout, env=env or ENV)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "apam_gossip", *args]


def test_centralized_over_mpi_converges_on_digits(tmp_path):
    out = tmp_path / "c.json"
    p = mpirun(3, *cli("train", "--mode", "centralized", "--epochs", "15", "--lr", "2e-3",
                       "--evals", "3", "-o", str(out)))
    assert p.returncode == 0, p.stdout + p.stderr
    d = json.loads(out.read_text())
    assert d["transport"] == "mpi" and d["mode"] == "centralized"
    assert d["config"]["workers"] == 2 and len(d["workers"]) == 2
    assert d["final_accuracy"] >= 0.95
    assert sum(d["staleness"].values()) == d["updates"]
    assert all(w["updates"] > 0 for w in d["workers"])
    assert p.stdout.count("result written to") == 1  # only rank 0 reports


@pytest.mark.slow
@pytest.mark.parametrize("adaptive_state", ["local", pytest.param("tracked",
                                                                   marks=pytest.mark.slow)])
def test_decentralized_over_mpi_converges_and_loses_nothing(tmp_path, adaptive_state):
    out = tmp_path / "d.json"
    p = mpirun(4, *cli("train", "--mode", "decentralized", "--topology",
                       str(HERE.parent / "topologies" / "ring4.edgelist"), "--epochs", "15",
                       "--lr", "2e-3", "--evals", "3", "--audit", "--adaptive-state",
                       adaptive_state, "-o", str(out),
                       # both ways of ordering the average and the gradient, once each
                       *(["--no-overlap"] if adaptive_state == "tracked" else [])))
    assert p.returncode == 0, p.stdout + p.stderr
    d = json.loads(out.read_text())
    assert d["transport"] == "mpi" and d["config"]["workers"] == 4
    assert d["final_accuracy"] >= 0.95
    last = d["evals"][-1]["extra"]
    assert last["audit_error"] <= 1e-5
    # one average per local step, unless every try found the peer mid-average (MPI)
    assert 0.6 * d["updates"] <= last["averages"] <= d["updates"]
    assert last["worst_worker_acc"] >= 0.9
    if adaptive_state == "tracked":  # the servers average u with x: sum u == sum vhat
        assert last["audit_u_error"] <= 1e-5
        assert last["u_spread"] < 0.5 * last["vhat_spread"], last


def test_gossip_over_mpi_through_staged_buffers_keeps_the_audit(tmp_path):
    """APAM_GOSSIP_ROWS=separate: each rank keeps its model apart from the buffers MPI
    sends, as a GPU rank does (a pinned copy each way, the average computed beside the
    model): no step lost, u tracked, on this CPU machine."""
    out = tmp_path / "d.json"
    p = mpirun(3, *cli("train", "--mode", "decentralized", "--topology", "complete",
                       "--epochs", "3", "--lr", "2e-3", "--evals", "1", "--audit",
                       "--adaptive-state", "tracked", "-o", str(out)),
               env={**ENV, "APAM_GOSSIP_ROWS": "separate"})
    assert p.returncode == 0, p.stdout + p.stderr
    last = json.loads(out.read_text())["evals"][-1]["extra"]
    assert last["audit_error"] <= 1e-5 and last["audit_u_error"] <= 1e-5, last
    assert last["averages"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["complete", "ring"])
def test_conservation_over_mpi(tmp_path, topology):
    out = tmp_path / "x.pt"
    p = mpirun(4, sys.executable, str(HERE / "mpi_scripts" / "consensus.py"), topology, "400",
               str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    r = torch.load(out, weights_only=True)
    x0, x = r["x0"].double(), r["x"].double()
    rel = ((x.mean(0) - x0.mean(0)).norm() / x0.mean(0).norm()).item()
    assert rel <= 1e-5
    d0 = ((x0 - x0.mean(0)) ** 2).sum(1).mean()
    d = ((x - x.mean(0)) ** 2).sum(1).mean()
    assert d <= 1e-6 * d0, (d, d0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["centralized", "decentralized"])
def test_a_failing_rank_ends_the_job_with_its_error(tmp_path, mode):
    out = tmp_path / "f.json"
    p = mpirun(3, sys.executable, str(HERE / "mpi_scripts" / "fail_rank.py"), mode, str(out),
               timeout=120)
    assert p.returncode != 0
    assert "[rank 1]" in p.stderr and "/nonexistent/fmnist" in p.stderr
    assert not out.exists()


@pytest.mark.slow
def test_readme_launch_script(tmp_path):
    out = tmp_path / "l.json"
    script = HERE.parent / "launch" / "mpirun.sh"
    p = subprocess.run([str(script), "-n", "2", "train", "--mode", "decentralized",
                        "--topology", "ring", "--steps", "100", "-o", str(out), "-q"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(out.read_text())["transport"] == "mpi"
    p = subprocess.run([str(script), "-n", "zero", "train"], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "-n N" in p.stderr


@pytest.mark.slow
def test_shm_transport_is_refused_under_mpirun(tmp_path):
    p = mpirun(2, *cli("train", "--transport", "shm", "--steps", "10",
                       "-o", str(tmp_path / "s.json")), timeout=120)
    assert p.returncode != 0
    assert "would start 2 separate runs" in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["allreduce", "dpsgd"])
def test_sync_baselines_over_mpi(tmp_path, mode):
    out = tmp_path / "s.json"
    p = mpirun(4, *cli("train", "--mode", mode, "--topology", "ring", "--epochs", "15",
                       "--lr", "2e-3", "--evals", "3", "-o", str(out),
                       "--slow", "1=3"))
    assert p.returncode == 0, p.stdout + p.stderr
    d = json.loads(out.read_text())
    assert d["transport"] == "mpi" and d["mode"] == mode
    assert d["final_accuracy"] >= 0.93
    # synchronous: every worker did every round, slowed or not
    assert {w["updates"] for w in d["workers"]} == {d["updates"]}
    assert d["workers"][1]["sleep_s"] > d["workers"][1]["compute_s"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["centralized", "decentralized"])
def test_both_modes_over_tcp_only(tmp_path, mode):
    """btl self,tcp on loopback: no shared memory between ranks, as across hosts."""
    out = tmp_path / "t.json"
    p = mpirun(3, *cli("train", "--mode", mode, "--topology", "ring", "--steps", "300",
                       "--lr", "2e-3", "--evals", "2", "--audit", "-o", str(out), "-q"),
               env=TCP_ENV)
    assert p.returncode == 0, p.stdout + p.stderr
    d = json.loads(out.read_text())
    assert d["transport"] == "mpi" and d["updates"] == 300
    assert d["final_accuracy"] >= 0.85
    if mode == "decentralized":
        assert d["evals"][-1]["extra"]["audit_error"] <= 1e-5


def test_gossip_refuses_mpi_below_thread_multiple(tmp_path):
    out = tmp_path / "never.json"
    p = mpirun(2, *cli("train", "--mode", "decentralized", "--steps", "50", "-o", str(out)),
               env={**ENV, "MPI4PY_RC_THREAD_LEVEL": "serialized"}, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    # `in`, not startswith: a stray byte of a rank killed by MPI_Abort can land in front
    # of a line in mpirun's shared stderr pipe (see test_loop)
    lines = [ln for ln in p.stderr.splitlines() if "apam-gossip: error:" in ln]
    assert lines and all("needs MPI_THREAD_MULTIPLE but MPI was initialised with "
                         "MPI_THREAD_SERIALIZED" in ln for ln in lines), p.stderr
    assert not out.exists()


def _rank_pid(rank: int, marker: str) -> int | None:
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmd and f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return int(d.name)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("shards", [1, 2])
def test_a_killed_rank_aborts_in_bounded_time_and_leaves_a_usable_checkpoint(tmp_path,
                                                                                shards):
    """OpenMPI here has no fault-tolerance extensions: a dead rank ends the job. The master
    checkpoints periodically, so the run resumes from the last checkpoint. With 2 master
    shards (ranks 0-1, workers on ranks 2-5) the checkpoint is their joined cut."""
    import signal
    import time

    from apam_gossip.checkpoint import load_checkpoint
    from apam_gossip.data import load_dataset
    from apam_gossip.runner import run

    ckpt = tmp_path / "mpi.ckpt"
    out = tmp_path / "never.json"
    cmd = [str(MPIRUN), "-n", str(3 + 1 + 2 * (shards - 1)), "--map-by", ":OVERSUBSCRIBE",
           *cli("train", "--mode", "centralized", "--epochs", "400", "--lr", "2e-3",
                "--slow", "0=3", "--slow", "1=3", "--slow", "2=3", "--evals", "2",
                "--master-shards", str(shards),
                "--checkpoint", str(ckpt), "--checkpoint-every", "0.2", "-o", str(out))]
    from apam_gossip.mpirun import job_shm_dir, stop_job

    shm = job_shm_dir()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**ENV, **shm.__enter__()}, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not ckpt.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ckpt.exists(), "no checkpoint was written"
        time.sleep(1.0)
        pid = _rank_pid(2, str(ckpt))
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        t = time.monotonic()
        _, err = p.communicate(timeout=60)
        assert p.returncode != 0
        assert time.monotonic() - t < 30  # bounded: the job ends, no rank waits forever
    finally:
        if p.poll() is None:
            stop_job(p)
        shm.__exit__(None, None, None)  # a killed rank's segment goes with the folder
    assert not out.exists()
    ck = load_checkpoint(ckpt)
    assert ck["version"] > 0 and ck["mode"] == "centralized"
    if shards > 1:
        assert ck["shard_versions"] == [ck["version"]] * shards
        assert not list(tmp_path.glob("mpi.ckpt.shard*"))  # the parts were joined
    # resume the checkpoint on one machine, with a smaller budget left to run
    r = run(None, dataset=load_dataset("digits"), resume=str(ckpt))  # type: ignore[arg-type]
    assert r.updates == -(-400 * 1437 // 32) and r.final_accuracy >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["centralized", "decentralized"])
def test_user_model_and_data_by_import_string_on_every_rank(tmp_path, mode):
    """Each rank imports the user's model, data and metric from their import strings."""
    out = tmp_path / "u.json"
    p = mpirun(3, *cli("train", "--mode", mode, "--topology", "ring", "--model",
                       "user_models:DigitsBN", "--metric", "user_models:error_rate",
                       "--no-metric-higher-is-better", "--epochs", "10", "--lr", "3e-3",
                       "--evals", "2", "-o", str(out), "-q"),
               env={**ENV, "PYTHONPATH": str(HERE)})
    assert p.returncode == 0, p.stdout + p.stderr
    d = json.loads(out.read_text())
    assert d["transport"] == "mpi" and d["task"]["model"] == "user_models:DigitsBN"
    assert d["final_metric"] <= 0.1  # error rate


@pytest.mark.parametrize("dim", [1, 2])
def test_gossip_over_mpi_tells_a_reply_from_a_refusal_at_any_model_size(tmp_path, dim):
    """Issue 19 (5): a refusal was told from a reply by its size (1 element), so with a
    1-element model every reply read as a refusal: 0 averages, and the mean moved (the
    peer had averaged, the asker kept its model). Pure gossip conserves sum_i x_i; every
    try is either an average or a refusal, counted once."""
    n, per_worker = 4, 200
    out = tmp_path / "g.pt"
    p = mpirun(n, sys.executable, str(HERE / "mpi_scripts" / "gossip_counts.py"), str(dim),
               str(per_worker), str(out), timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    r = torch.load(out, weights_only=True)
    x0, x = r["x0"].double(), r["x"].double()
    rel = ((x.mean(0) - x0.mean(0)).norm() / x0.mean(0).norm()).item()
    assert rel <= 1e-5, (rel, x0.mean(0), x.mean(0))
    assert sum(r["averages"]) > 0, r
    assert sum(r["averages"]) + sum(r["refused"]) == n * per_worker, r
    d0 = ((x0 - x0.mean(0)) ** 2).sum(1).mean()
    assert ((x - x.mean(0)) ** 2).sum(1).mean() < 1e-3 * d0  # and they did mix
