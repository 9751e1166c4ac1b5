"""What the autouse leak check of ``conftest.py`` counts: the child processes of this
test process, and the /dev/shm entries that this test session's own processes made.

/dev/shm is shared by everything on the machine: another test run, another user's MPI
job, joblib's ``sem.loky-*`` semaphores. Comparing all of it before and after a test
failed whichever test was running when any of them made an entry. So the session marks
what its processes make with a tag of its own, :data:`SESSION_TAG`, set once for the
session by :func:`tagging` before any test module is imported (modules that copy
``os.environ`` at import, as test_mpi's ``ENV`` does, carry it too):

* the environment variable ``APAM_GOSSIP_SHM_TAG``, which every process the tests start
  inherits and :func:`apam_gossip.mpirun.job_shm_dir` (and ``launch/mpirun.sh``) put into
  the name of each MPI job's segment folder: ``apam-mpi-TAG-XXXX``;
* multiprocessing's semaphore prefix in this process, ``/mp-TAG``, so its semaphores and
  locks (the shared-memory transport's) are ``sem.mp-TAG-XXXX``; spawned children copy
  their parent's prefix with the rest of its process configuration. joblib's loky, which
  scikit-learn imports (the digits data), replaces multiprocessing's naming in the whole
  process with ``/loky-PID-XXXX``, which would hide this session's semaphores from the
  check: loky is imported first and multiprocessing's own naming put back over it
  (:func:`keep_semaphore_naming`, again at every test in case anything else replaces it).

An entry is this session's if ``-TAG-`` is part of its name; everything else is of
unknown origin and ignored. Torch's shared tensors never show (the ``file_descriptor``
strategy unlinks them at once), and every ``mpirun`` the package or the tests start has
a segment folder from ``job_shm_dir``, so no loose ``sm_segment.*`` file is ours.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import secrets
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import synchronize
from pathlib import Path

SHM = Path("/dev/shm")
TAG_ENV = "APAM_GOSSIP_SHM_TAG"


def new_tag() -> str:
    """A tag no other session on this machine has: this process's id (unique among live
    processes) and a random part (for pid namespaces that share one /dev/shm)."""
    return f"pytest{os.getpid()}r{secrets.token_hex(3)}"


# this session's tag: made once, when conftest first imports this module
SESSION_TAG = new_tag()


def semprefix() -> str:
    """The prefix multiprocessing gives new semaphores in this process ('/mp' by
    default; the semaphore's file is ``sem.`` + its name without the slash)."""
    return multiprocessing.current_process()._config["semprefix"]


def _prefixed_name() -> str:
    """multiprocessing's own name for a new semaphore: the prefix, then a random part."""
    return f"{semprefix()}-{next(synchronize.SemLock._rand)}"


_NAMING = staticmethod(_prefixed_name)


def keep_semaphore_naming() -> bool:
    """Put multiprocessing's own semaphore naming (by :func:`semprefix`) back if a
    library replaced it; whether it had to."""
    if synchronize.SemLock.__dict__.get("_make_name") is _NAMING:
        return False
    synchronize.SemLock._make_name = _NAMING
    return True


@contextlib.contextmanager
def tagging(tag: str) -> Iterator[None]:
    """While inside: processes started from here carry ``tag`` in their environment and
    this process's semaphores in their names; all restored after."""
    # loky renames every semaphore of the process when it is first imported: it is
    # imported now, so that the naming put in place below stays
    with contextlib.suppress(ImportError):
        import joblib.externals.loky.backend  # noqa: F401
    config = multiprocessing.current_process()._config
    old_env, old_prefix = os.environ.get(TAG_ENV), config.get("semprefix")
    old_naming = synchronize.SemLock.__dict__.get("_make_name")
    os.environ[TAG_ENV] = tag
    config["semprefix"] = f"/mp-{tag}"
    keep_semaphore_naming()
    try:
        yield
    finally:
        if old_naming is not None:
            synchronize.SemLock._make_name = old_naming
        if old_env is None:
            os.environ.pop(TAG_ENV, None)
        else:
            os.environ[TAG_ENV] = old_env
        if old_prefix is None:
            config.pop("semprefix", None)
        else:
            config["semprefix"] = old_prefix


def shm_entries() -> set[str]:
    try:
        return set(os.listdir(SHM))
    except OSError:
        return set()


def ours(names: Iterable[str], tag: str) -> set[str]:
    """The names that carry ``tag`` as a whole dash-delimited part (so that tag ``x1``
    does not claim ``x12``'s entries)."""
    mark = f"-{tag}-"
    return {n for n in names if mark in n}


def children(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc): what this process started, and what
    those started in turn, never another process on the machine."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z":  # a zombie is dead; its parent reaps it
            continue
        kids.setdefault(int(fields[1]), []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def helpers() -> set[int]:
    """Long-lived helper processes the standard library keeps per interpreter (the
    multiprocessing resource tracker): not leaks of a test."""
    from multiprocessing import resource_tracker

    pid = getattr(resource_tracker._resource_tracker, "_pid", None)
    return {pid} if pid else set()


@dataclass(frozen=True)
class Snapshot:
    """This process's children and this session's /dev/shm entries at one moment (the
    start of a test); the ``leaked_*`` methods give what is new since."""

    tag: str
    kids: frozenset[int]
    shm: frozenset[str]

    @classmethod
    def take(cls, tag: str) -> Snapshot:
        return cls(tag, frozenset(children(os.getpid())), frozenset(ours(shm_entries(), tag)))

    def leaked_processes(self, wait: float = 0.0) -> list[int]:
        """Descendants started since, still alive after up to ``wait`` seconds (a
        process that is ending gets the time to)."""
        deadline = time.monotonic() + wait
        while True:
            leaked = set(children(os.getpid())) - self.kids - helpers()
            if not leaked or time.monotonic() >= deadline:
                return sorted(leaked)
            time.sleep(0.1)

    def leaked_shm(self) -> list[str]:
        """This session's /dev/shm entries made since and still there. The garbage is
        collected first: a semaphore freed with its (unreachable) owner is not a leak,
        one that outlives every owner is."""
        gc.collect()
        return sorted(ours(shm_entries(), self.tag) - self.shm)


def kill(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
