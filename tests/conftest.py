"""Shared fixtures: the digits data, and every test is checked for leaked child processes
and /dev/shm segments (only this session's own: see ``leaks.py``)."""

from __future__ import annotations

import contextlib

import leaks
import pytest

_tagging = contextlib.ExitStack()


def pytest_configure(config: pytest.Config) -> None:
    # before any test module is imported: modules that copy os.environ at import (the
    # ENV of the MPI tests) then carry the tag to the jobs they start
    _tagging.enter_context(leaks.tagging(leaks.SESSION_TAG))


def pytest_unconfigure(config: pytest.Config) -> None:
    _tagging.close()


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves child processes or shared-memory segments of this session
    behind (and kill the leftover processes so later tests are not affected). Entries
    other processes on the machine make meanwhile are not this test's and are ignored."""
    leaks.keep_semaphore_naming()  # in case something a test imported replaced it
    snap = leaks.Snapshot.take(leaks.SESSION_TAG)
    yield
    leaked = snap.leaked_processes(wait=10.0)
    leaks.kill(leaked)
    new_shm = snap.leaked_shm()
    assert not leaked, f"test leaked child processes {leaked}"
    assert not new_shm, f"test leaked shared memory segments {new_shm}"


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's real 8x8 digits (the offline default), loaded once per session."""
    from apam_gossip.data import load_dataset

    return load_dataset("digits")
