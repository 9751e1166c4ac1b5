"""A model that reports whether a gossip worker's gradient runs beside its average.

``overlap_probe:overlap_probe_net`` (importable by string: the tests folder is on the
workers' sys.path) is a small digits MLP. In a worker process, when
``$APAM_TEST_OVERLAP_LOG`` names a file, each training forward pass (the start of a
gradient) first watches the process's other threads for up to :data:`WATCH_S` seconds
for one inside an average with a neighbor
(:func:`apam_gossip.algorithms.adpsgd.average_with_a_neighbor`), then appends one line
to the file: ``1`` if it saw one, ``0`` if not. It looks at what runs, not at clocks, so
a loaded machine cannot make the answer wrong, only slower.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from types import FrameType

from torch import Tensor, nn

LOG_ENV = "APAM_TEST_OVERLAP_LOG"
# long enough to see an average that is scheduled late on a loaded machine; a run
# without overlap pays it at every step, so such runs are kept short
WATCH_S = 0.5
AVERAGE = "average_with_a_neighbor"


def _in_average(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_name == AVERAGE and frame.f_code.co_filename.endswith("adpsgd.py"):
            return True
        frame = frame.f_back
    return False


def average_in_another_thread(watch_s: float) -> bool:
    """Whether, within ``watch_s`` seconds, another thread of this process is seen
    inside an average with a neighbor."""
    me = threading.get_ident()
    deadline = time.monotonic() + watch_s
    while True:
        if any(_in_average(f) for t, f in sys._current_frames().items() if t != me):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)


class OverlapProbe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, x: Tensor) -> Tensor:
        log = os.environ.get(LOG_ENV)
        # workers only: the run's own process pushes a batch through the model before
        # they start (preflight) and evaluates it, neither of which is a gradient beside
        # an average
        if log and self.training \
                and multiprocessing.current_process().name.startswith("worker"):
            seen = average_in_another_thread(WATCH_S)
            with open(log, "a") as f:  # one short append per line: lines never interleave
                f.write(f"{int(seen)}\n")
        return self.net(x)


def overlap_probe_net() -> nn.Module:
    return OverlapProbe()
