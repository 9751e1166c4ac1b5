"""syncps, the APAM paper's synchronous parameter server (issue 23): real processes on
shared memory and under mpirun, each test with a timeout."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from apam_gossip.algorithms.common import LocalWorker
from apam_gossip.cli import main
from apam_gossip.config import ConfigError, ignored_settings
from apam_gossip.core.sync import split_batch, weighted_mean
from apam_gossip.data import partition
from apam_gossip.optim import Optimizer
from apam_gossip.procs import ChildFailed
from apam_gossip.runner import run
from apam_gossip.task import make_task

from helpers import make_cfg

HERE = Path(__file__).parent
MPIRUN = Path(sys.executable).parent / "mpirun"
# a model with buffers (BatchNorm's running statistics) and dropout: the buffers are
# averaged with the gradients, each worker's dropout is its own seeded stream (in its own
# process); without dropout where one process plays several workers or the sequential run
BN = "user_models:DigitsBN"
BN_ONLY = "user_models:DigitsBNNoDropout"
# one torch thread everywhere: a reduction's bits do not depend on how it was split
ONE = {"threads_per_worker": 1}

pytestmark = pytest.mark.timeout(180)


def test_split_batch_and_weighted_mean():
    assert split_batch(17, 3) == [6, 6, 5] and split_batch(4, 4) == [1] * 4
    assert split_batch(32, 1) == [32]
    with pytest.raises(ConfigError, match=r"batch_size 3 is smaller than the 4 workers; "
                       r"use --batch-size 4 or more"):
        split_batch(3, 4)
    g = torch.randn(10)
    assert torch.equal(weighted_mean(torch.empty(10), [g], [7]), g)  # one worker: exact
    a, b = torch.randn(10), torch.randn(10)
    out = weighted_mean(torch.empty(10), [a, b], [3, 1])
    assert torch.allclose(out, 0.75 * a + 0.25 * b)


def test_settings_that_apply_to_syncps():
    given = ["topology", "master_device", "optim.lookahead"]
    ignored = dict(ignored_settings(given, ["syncps"], make_cfg().optim))
    assert set(ignored) == {"topology", "optim.lookahead"}  # master_device applies


def test_one_worker_is_the_sequential_run_bit_for_bit(digits):
    common = dict(workers=1, steps=40, evals=2, model=BN_ONLY, optim={"schedule": "cosine"}, **ONE)
    a = run(make_cfg(mode="syncps", **common), dataset=digits, quiet=True)
    s = run(make_cfg(mode="sequential", **common), dataset=digits, quiet=True)
    assert a.mode == "syncps" and a.updates == 40 and a.samples == 40 * 16
    assert torch.equal(a.final_params, s.final_params)
    assert [(e.updates, e.samples, e.test_loss) for e in a.evals] == \
        [(e.updates, e.samples, e.test_loss) for e in s.evals]
    assert a.staleness == {0: 40} and a.workers[0].updates == 40


def test_two_workers_match_a_hand_computed_reference(digits):
    """Two LocalWorker streams on their shares of B = 15 (8 and 7), the mean of their
    messages [grads | buffers] weighted by samples, one AMSGrad step each: the shm run,
    bit for bit. The mean is taken in float32 in worker order, as the master does: the
    bias of the layer before BatchNorm has a gradient of rounding noise, which AMSGrad
    scales to lr-sized steps, so a mean rounded otherwise (float64) drifts by 1e-2."""
    steps, batches = 25, (8, 7)
    cfg = make_cfg(mode="syncps", workers=2, steps=steps, model=BN_ONLY,
                   data={"batch_size": 15}, optim={"schedule": "cosine"}, **ONE)
    r = run(cfg, dataset=digits, quiet=True)
    assert r.updates == steps and r.samples == steps * 15
    assert [w.samples for w in r.workers] == [steps * b for b in batches]
    assert [w.updates for w in r.workers] == [steps, steps]

    torch.set_num_threads(1)
    shards = partition(digits.y_train, 2, "iid", 0.5, cfg.seed)
    task = make_task(cfg, digits, check=False)
    ws = [LocalWorker.build(cfg.replace(data={"batch_size": b}), task, digits, shards[i], i,
                            torch.device("cpu")) for i, b in enumerate(batches)]
    x, n = task.initial_state()
    assert x.numel() > n  # the model has buffers
    opt = Optimizer(cfg.optim)
    st = opt.init(x[:n])
    for k in range(1, steps + 1):
        msgs = []
        for w in ws:
            w.flat.state.copy_(x)
            _, nb, _ = w.gradient()
            assert nb == batches[w.index]
            msgs.append(w.flat.pack_grad_msg().clone())
        mean = (msgs[0] * (8 / 15)).add_(msgs[1], alpha=7 / 15)
        x[n:] = mean[n:]
        opt.update(x[:n], mean[:n], st, lr=opt.lr_at(k, steps))
    assert torch.equal(r.final_params, x), (r.final_params - x).abs().max().item()


def test_a_global_batch_smaller_than_the_workers_is_refused(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["train", "--mode", "syncps", "--workers", "4", "--batch-size", "3",
                 "--steps", "5", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "batch_size 3 is smaller than the 4 workers" in err and "--batch-size 4" in err
    assert not out.exists()


def test_a_killed_worker_fails_the_run_naming_it(digits):
    killed: list[int] = []

    def kill(ev) -> None:
        if ev.kind == "progress" and not killed:
            for p in multiprocessing.active_children():
                if p.name == "worker 1":
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)

    t = time.monotonic()
    with pytest.raises(ChildFailed, match=r"worker 1"):
        run(make_cfg(mode="syncps", workers=3, epochs=400, timeout_s=120), dataset=digits,
            callback=kill)
    assert killed and time.monotonic() - t < 60  # at once, not after the timeout


def test_sigterm_stops_the_cli_run_with_143(tmp_path):
    """Lockstep, as allreduce: no checkpoint, one line saying so, exit 143; the no_leaks
    fixture checks that no process or /dev/shm segment is left."""
    out = tmp_path / "never.json"
    p = subprocess.Popen([sys.executable, "-m", "apam_gossip", "train", "--mode", "syncps",
                          "--workers", "2", "--epochs", "400", "--evals", "400",
                          "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        assert p.stdout is not None
        for line in p.stdout:  # the evaluation lines: training has begun
            if "samples=" in line and " samples=        0 " not in line:
                break
            assert time.monotonic() < deadline
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 143, err
        stops = [ln for ln in err.splitlines() if "run interrupted after" in ln]
        assert len(stops) == 1 and "this mode writes no checkpoints" in stops[0], err
        assert "Traceback" not in err and "killed by signal" not in err, err
        assert not out.exists()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_the_loop_api_points_to_train():
    import apam_gossip as ag

    with pytest.raises(ag.LoopError, match=r"^mode 'syncps' is not available in the loop "
                       r"API: use `apam-gossip train --mode syncps`$"):
        ag.init(mode="syncps")


# ------------------------------------------------------------------------------ MPI
MPI_ENV = {
    **os.environ,
    "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "self,sm,tcp", "OMPI_MCA_osc": "sm,rdma",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]),
}
needs_mpi = pytest.mark.skipif(not MPIRUN.exists(), reason="mpirun not in the venv: pip "
                               "install 'apam_gossip[mpi]' (launch/setup.sh does)")


def _train(*args: str) -> list[str]:
    return [sys.executable, "-m", "apam_gossip", "train", "--mode", "syncps", "--steps", "30",
            "--model", BN, "--threads-per-worker", "1", "--schedule", "cosine", "-q", *args]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["state_dict"]


@needs_mpi
@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [2, 3])
def test_shm_and_mpi_give_the_same_model(tmp_path, workers):
    """Deterministic: the same config gives the same bits on both transports (B = 17 is
    not a multiple of 2 or 3: uneven shares)."""
    from apam_gossip.mpirun import run_mpirun

    p = run_mpirun(workers + 1, _train("--batch-size", "17", "--save-model",
                                       str(tmp_path / "mpi.pt"), "-o", str(tmp_path / "m.json")),
                   timeout=180, env=MPI_ENV)
    assert p.returncode == 0, p.stdout + p.stderr
    q = subprocess.run(_train("--workers", str(workers), "--batch-size", "17", "--save-model",
                              str(tmp_path / "shm.pt"), "-o", str(tmp_path / "s.json")),
                       capture_output=True, text=True, timeout=180, env=MPI_ENV)
    assert q.returncode == 0, q.stdout + q.stderr
    a, b = _state(tmp_path / "mpi.pt"), _state(tmp_path / "shm.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import json

    m, s = (json.loads((tmp_path / f).read_text()) for f in ("m.json", "s.json"))
    assert m["transport"] == "mpi" and s["transport"] == "shm" and m["mode"] == "syncps"
    assert m["config"]["workers"] == workers == len(m["workers"])
    assert [w["samples"] for w in m["workers"]] == [w["samples"] for w in s["workers"]] \
        == [30 * b for b in split_batch(17, workers)]
    assert [e["test_loss"] for e in m["evals"]] == [e["test_loss"] for e in s["evals"]]


@needs_mpi
def test_mpi_refuses_a_global_batch_smaller_than_the_workers(tmp_path):
    from apam_gossip.mpirun import run_mpirun

    out = tmp_path / "never.json"
    p = run_mpirun(4, _train("--batch-size", "2", "-o", str(out)), timeout=120, env=MPI_ENV)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if "apam-gossip: error:" in ln]
    assert lines and all("batch_size 2 is smaller than the 3 workers" in ln for ln in lines), \
        p.stderr
    assert not out.exists()
