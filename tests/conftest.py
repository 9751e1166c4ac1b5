"""Shared fixtures: the digits data, and every test is checked for leaked child processes
and /dev/shm segments."""

from __future__ import annotations

import gc
import os
import signal
import time
from pathlib import Path

import pytest


def _children(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc)."""
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


def _helpers() -> set[int]:
    """Long-lived helper processes the standard library keeps per interpreter (the
    multiprocessing resource tracker): not leaks of a test."""
    from multiprocessing import resource_tracker

    pid = getattr(resource_tracker._resource_tracker, "_pid", None)
    return {pid} if pid else set()


def _shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves child processes or shared-memory segments behind (and
    kill the leftovers so later tests are not affected)."""
    before_kids = set(_children(os.getpid()))
    before_shm = _shm()
    yield
    deadline = time.monotonic() + 10.0
    leaked = set(_children(os.getpid())) - before_kids - _helpers()
    while leaked and time.monotonic() < deadline:
        time.sleep(0.1)
        leaked = set(_children(os.getpid())) - before_kids - _helpers()
    for pid in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # every new entry: torch's and ours, OpenMPI's sm_segment.* and anything else. The
    # garbage is collected first: a semaphore freed with its (unreachable) owner is not a
    # leak, one that outlives every owner is
    gc.collect()
    new_shm = sorted(_shm() - before_shm)
    assert not leaked, f"test leaked child processes {sorted(leaked)}"
    assert not new_shm, f"test leaked shared memory segments {new_shm}"


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's real 8x8 digits (the offline default), loaded once per session."""
    from apam_gossip.data import load_dataset

    return load_dataset("digits")
