"""Micro-benchmarks of the transports (``apam-gossip bench transport | pairwise``).

* ``transport``: the same training run on the single-machine runtime (shared memory) and
  under ``mpirun``, alternated ``--repeats`` times, side by side; reports samples/s of
  each and the MPI/shm ratio (the goal: MPI within 20%).
* ``pairwise``: under ``mpirun -n 2``, the time of one atomic pairwise average of a model
  of ``--size-mb`` MB (request + model out, average back, applied as a delta) next to the
  MPI ping-pong time of the same number of bytes (send there and back).

Both launch ``mpirun`` themselves with the settings of ``launch/mpirun.sh``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import UserError


def mpirun_command(n: int) -> list[str]:
    mpirun = Path(sys.executable).parent / "mpirun"
    if not mpirun.exists():
        raise UserError("mpirun not found next to this Python: pip install 'apam_gossip[mpi]' "
                        "(launch/setup.sh does)")
    return [str(mpirun), "-n", str(n), "--map-by", ":OVERSUBSCRIBE"]


def mpi_env() -> dict[str, str]:
    env = dict(os.environ)
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.setdefault("OMPI_MCA_pml", "ob1")
    env.setdefault("OMPI_MCA_btl", "self,sm")
    return env


def _run_cli(args: list[str], n_mpi: int | None, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        cmd = [sys.executable, "-m", "apam_gossip", "train", *args, "-o", str(out), "-q"]
        if n_mpi is not None:
            cmd = mpirun_command(n_mpi) + cmd
            env = mpi_env()
        else:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI"))}
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"benchmark run failed ({' '.join(cmd)}):\n{p.stderr[-2000:]}")
        return json.loads(out.read_text())


def bench_transport(mode: str, workers: int, train_args: list[str], repeats: int,
                    timeout: float = 600) -> dict:
    """Alternate shm and MPI runs of the same config; samples/s of each, and the ratio."""
    ranks = workers + 1 if mode == "centralized" else workers
    args = ["--mode", mode, "--workers", str(workers), *train_args]
    shm, mpi = [], []
    for _ in range(repeats):
        shm.append(_run_cli(args, None, timeout)["samples_per_s"])
        mpi.append(_run_cli(args, ranks, timeout)["samples_per_s"])
    return {"mode": mode, "workers": workers, "args": train_args, "shm_samples_per_s": shm,
            "mpi_samples_per_s": mpi, "ratio_median": statistics.median(mpi) /
            statistics.median(shm)}


def pairwise_worker(size_mb: float, reps: int) -> None:
    """Body of ``bench pairwise`` under ``mpirun -n 2``: rank 0 prints a JSON line."""
    import torch

    from .transport.mpi import MpiGossip, _wait, world

    comm, rank, size = world()
    if size != 2:
        raise UserError("the pairwise benchmark needs exactly 2 ranks")
    numel = int(size_mb * 2**20 / 4)
    buf = torch.zeros(numel)
    peer = 1 - rank
    comm.Barrier()
    pingpong = []
    for _ in range(reps):
        t = time.perf_counter()
        if rank == 0:
            comm.Send(buf, dest=1, tag=1)
            comm.Recv(buf, source=1, tag=2)
        else:
            comm.Recv(buf, source=0, tag=1)
            comm.Send(buf, dest=0, tag=2)
        pingpong.append(time.perf_counter() - t)
    g = MpiGossip(comm, torch.randn(numel), tracked=False, total=0, timeout=60)
    comm.Barrier()
    avg = []
    if rank == 0:
        for _ in range(reps):
            t = time.perf_counter()
            g.average_with(peer)
            avg.append(time.perf_counter() - t)
    g.finish()
    # a memcpy of the model, for scale
    src = torch.randn(numel)
    copies = []
    for _ in range(reps):
        t = time.perf_counter()
        buf.copy_(src)
        copies.append(time.perf_counter() - t)
    _wait(comm.Ibarrier(), 60, "the other rank")
    if rank == 0:
        med = statistics.median
        print(json.dumps({"size_mb": size_mb, "reps": reps,
                          "pingpong_s": med(pingpong), "pairwise_average_s": med(avg),
                          "memcpy_s": med(copies),
                          "ratio_average_to_pingpong": med(avg) / med(pingpong)}))


def bench_pairwise(size_mb: float, reps: int, timeout: float = 300) -> dict:
    cmd = mpirun_command(2) + [sys.executable, "-m", "apam_gossip.bench", "pairwise",
                               str(size_mb), str(reps)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=mpi_env())
    if p.returncode != 0:
        raise RuntimeError(f"pairwise benchmark failed:\n{p.stderr[-2000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


if __name__ == "__main__":  # the mpirun side of bench_pairwise
    if sys.argv[1] == "pairwise":
        pairwise_worker(float(sys.argv[2]), int(sys.argv[3]))
