"""Reliability: worker and master deaths (real processes, real SIGKILL)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from apam_gossip.config import RunConfig
from apam_gossip.procs import ChildFailed
from apam_gossip.runner import run

from helpers import make_cfg

# the kills mid-run train to 95% (slow); the deaths at start-up are short runs
pytestmark = pytest.mark.timeout(240)


def _cfg(mode: str, **kw) -> RunConfig:
    return make_cfg({"mode": mode, "workers": 8, "epochs": 40, "evals": 4, "slowdown": [4] * 8,
                     "data": {"batch_size": 32},
                     "optim": {"lr": 2e-3 if mode == "centralized" else 4e-3}}, **kw)


class KillAt:
    """A run callback that SIGKILLs one child process once the run passes a fraction of
    its sample budget."""

    def __init__(self, name: str, fraction: float) -> None:
        self.name, self.fraction, self.done, self.at = name, fraction, False, None
        self.died_events: list[str] = []

    def __call__(self, ev) -> None:
        if ev.kind == "died":
            self.died_events.append(ev.message)
        if self.done or not ev.total_samples or ev.samples < self.fraction * ev.total_samples:
            return
        for p in multiprocessing.active_children():
            if p.name == self.name:
                os.kill(p.pid, signal.SIGKILL)
                self.done, self.at = True, ev.samples / ev.total_samples


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["centralized", "decentralized"])
def test_run_survives_a_killed_worker(digits, mode):
    calm = run(_cfg(mode), dataset=digits)
    kill = KillAt("worker 3", 0.3)
    hurt = run(_cfg(mode), dataset=digits, callback=kill)
    assert kill.done and kill.at < 0.7, kill.at
    assert hurt.failed_workers == [3]
    assert any("worker 3" in m for m in kill.died_events)
    assert hurt.workers[3].updates < hurt.updates / 8  # it stopped contributing
    assert calm.final_accuracy >= 0.95 and hurt.final_accuracy >= 0.95, (
        calm.final_accuracy, hurt.final_accuracy)


@pytest.mark.slow
def test_master_death_ends_the_run_quickly_with_a_clear_error(digits):
    kill = KillAt("master", 0.2)
    t = time.monotonic()
    with pytest.raises(ChildFailed, match="master: process died"):
        run(_cfg("centralized"), dataset=digits, callback=kill)
    assert kill.done
    assert time.monotonic() - t < 30  # and the no_leaks fixture checks every worker exited


def _dead_at_start_cfg(mode: str) -> RunConfig:
    # worker 3 SIGKILLs itself while it builds its model, before its hello; the run's own
    # timeout (60 s) is far below the 300 s a worker waits for the start signal, so a
    # run that waited for the dead worker's hello fails here with RunTimeout
    return make_cfg({"mode": mode, "workers": 4, "steps": 200, "timeout_s": 60.0,
                     "model": "user_models:dies_in_worker_3",
                     "audit": mode == "decentralized"})


@pytest.mark.parametrize("mode", ["decentralized", "centralized"])
def test_a_worker_dead_at_start_is_counted_out_at_once(digits, mode):
    """Issue 19 (4): a worker that dies during start-up is counted out at once, as one
    killed mid-run is, and the others do the whole budget. Gossip used to wait for every
    worker's hello: 300 s of nothing, then a TimeoutError."""
    died: list[str] = []
    t = time.monotonic()
    r = run(_dead_at_start_cfg(mode), dataset=digits,
            callback=lambda ev: died.append(ev.message) if ev.kind == "died" else None)
    took = time.monotonic() - t
    assert r.failed_workers == [3]
    assert any("worker 3" in m for m in died), died
    assert r.updates == 200
    assert r.workers[3].updates == 0  # it never trained
    assert all(w.updates > 0 for w in r.workers[:3])
    assert r.final_params is not None and r.final_params.isfinite().all()
    if mode == "decentralized":  # it never took part: the invariant still holds
        assert r.evals[-1].extra["audit_error"] <= 1e-5
    # the issue asks for <= 10 s (about 5-8 s measured on 2 cores, most of it spawning
    # and importing torch); slack for a loaded machine, still far from the 300 s wait
    assert took < 60, took


@pytest.mark.parametrize("mode", ["allreduce", "dpsgd"])
def test_lockstep_modes_fail_at_once_when_a_worker_dies_at_start(digits, mode):
    """Lockstep modes cannot go on without a worker: one that dies during start-up fails
    the run at once, naming it, instead of leaving the others at the first barrier."""
    t = time.monotonic()
    with pytest.raises(ChildFailed, match=r"worker 3: process died \(killed by signal 9\)"):
        run(_dead_at_start_cfg(mode), dataset=digits)
    assert time.monotonic() - t < 60  # measured about 3 s; the barrier waits timeout_s
