"""Reliability: worker and master deaths (real processes, real SIGKILL)."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest

from apam_gossip.config import RunConfig
from apam_gossip.procs import ChildFailed
from apam_gossip.runner import run

from helpers import make_cfg

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


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


def test_master_death_ends_the_run_quickly_with_a_clear_error(digits):
    import time

    kill = KillAt("master", 0.2)
    t = time.monotonic()
    with pytest.raises(ChildFailed, match="master: process died"):
        run(_cfg("centralized"), dataset=digits, callback=kill)
    assert kill.done
    assert time.monotonic() - t < 30  # and the no_leaks fixture checks every worker exited
