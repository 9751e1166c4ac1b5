"""Pure tier: the transport ends and the coordinator, in one process (no children).

The shared-memory ends are driven directly (their atomic operations, the counters a
checkpoint reads, the recovery of a lock whose holder died); the coordinator is driven
by a fake process group that delivers scripted messages.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from apam_gossip.coordinator import Coordinator, RunInterrupted, RunTimeout
from apam_gossip.messages import (
    Died,
    Grad,
    Hello,
    Interrupted,
    MasterSummary,
    Params,
    Progress,
    Snapshot,
    Stop,
    WorkerReport,
)
from apam_gossip.procs import ChildFailed
from apam_gossip.transport import PeerGone
from apam_gossip.transport.shm import ShmGossip, ShmStar, ShmSync

from helpers import make_cfg

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------ gossip (shm) ends
def test_local_steps_are_counted_with_the_step_and_seen_together_by_a_copy():
    g = ShmGossip(3, 4, dtype=torch.float64)
    ends = [g.end(i, 5.0) for i in range(3)]
    for i, k in ((0, 3), (1, 1), (2, 2)):
        for _ in range(k):
            ends[i].update_local(lambda x, u: x.add_(1.0))
    ends[0].average_with(2)
    c = g.consistent_copy(5.0, with_opt_state=True)
    assert c.completed == 6 == int(c.done_by.sum()) and c.done_by.tolist() == [3, 1, 2]
    assert c.averages == 1
    assert c.x[:, 0].tolist() == [2.5, 1.0, 2.5]  # x0 = 3 and x2 = 2 averaged
    assert float(c.x.sum()) == 4 * 6  # averages conserve the sum: 4 entries x 6 steps


def test_claim_hands_out_each_update_once_then_zero():
    g = ShmGossip(2, 1)
    a, b = g.end(0, 5.0), g.end(1, 5.0)
    got = [a.claim(5), b.claim(5), a.claim(5), b.claim(5), a.claim(5), b.claim(5)]
    assert got == [1, 2, 3, 4, 5, 0]
    g2 = ShmGossip(1, 1)
    g2.stop[0] = 1  # the coordinator asked to stop
    assert g2.end(0, 5.0).claim(5) == 0


def test_recovery_frees_the_locks_a_dead_worker_held():
    g = ShmGossip(3, 2)
    dead = g.end(1, 5.0)
    dead._acquire(1)
    dead._acquire(2)  # as if killed inside an average with worker 2
    assert g.holders.tolist() == [-1, 1, 1]
    assert sorted(g.recover(1)) == [1, 2]
    assert g.holders.tolist() == [-1, -1, -1] and not g.end(0, 5.0).is_alive(1)
    g.end(2, 1.0).update_local(lambda x, u: x.add_(1.0))  # would time out if still held
    assert float(g.x[2, 0]) == 1.0


def test_a_lock_that_is_never_released_times_out_naming_it():
    g = ShmGossip(2, 2)
    g.end(1, 5.0)._acquire(1)
    with pytest.raises(TimeoutError, match="worker 0: waited 0.2 s for worker 1's lock"):
        g.end(0, 0.2).average_with(1)


# -------------------------------------------------------------------- star (shm) ends
def test_star_ends_in_process():
    star = ShmStar(2, 3)
    master, w0, w1 = star.master_end(), star.worker_end(0), star.worker_end(1)
    w1.send(None, Hello(1))
    assert master.ready(1.0) == [1]
    assert master.ready(0.0) == [1]  # level-triggered: listed until taken
    assert master.recv(1)[0] == Hello(1) and master.ready(0.0) == []
    master.send(1, torch.tensor([1.0, 2.0, 3.0]), Params(7))
    out = torch.zeros(3)
    assert w1.recv(out, timeout=1.0) == Params(7) and out.tolist() == [1.0, 2.0, 3.0]
    w1.send(torch.full((3,), 0.5), Grad(7, 16, 0.25, 0.001))
    msg, grad = master.recv(1)
    assert msg == Grad(7, 16, 0.25, 0.001) and grad.tolist() == [0.5] * 3
    master.send(0, None, Stop())
    assert isinstance(w0.recv(torch.zeros(3), timeout=1.0), Stop)
    w0.conn.close()  # worker 0's process died
    with pytest.raises(PeerGone):
        master.recv(0)


def test_sync_allreduce_and_mix_between_two_threads():
    s = ShmSync(2, 2)
    ends = [s.end(0, 5.0), s.end(1, 5.0)]
    ts = [torch.tensor([1.0, 3.0]), torch.tensor([3.0, 5.0])]
    xs = [torch.tensor([0.0, 4.0]), torch.tensor([8.0, 0.0])]

    def worker(i):
        ends[i].allreduce_mean(ts[i])
        ends[i].mix(xs[i], [(0, 0.75), (1, 0.25)] if i == 0 else [(0, 0.5), (1, 0.5)])

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert ts[0].tolist() == ts[1].tolist() == [2.0, 4.0]
    assert xs[0].tolist() == [2.0, 3.0] and xs[1].tolist() == [4.0, 2.0]


# ------------------------------------------------------------------------ coordinator
class FakeGroup:
    """Delivers one scripted batch of messages per poll; joins as told."""

    def __init__(self, script, joins: bool = True) -> None:
        self.script, self.joins, self.polls = list(script), joins, 0

    def poll(self, timeout):
        self.polls += 1
        return self.script.pop(0) if self.script else []

    def alive(self):
        return [] if self.joins else ["worker 0"]

    def join(self, timeout):
        return self.joins


class FakeMode:
    poll_s = 0.0

    def __init__(self, until: int = 2) -> None:
        self.seen, self.ticks, self.stops, self.until = [], 0, 0, until
        self.interrupted = None
        self.finished_called = 0

    def handle(self, name, msg):
        self.seen.append((name, msg))

    def tick(self):
        self.ticks += 1

    def finished(self):
        return len(self.seen) >= self.until or self.interrupted is not None

    def finish(self):
        self.finished_called += 1

    def request_stop(self):
        self.stops += 1
        self.interrupted = Interrupted("x.ckpt", 5)


def test_coordinator_dispatches_in_order_and_finishes_once():
    mode = FakeMode(until=3)
    group = FakeGroup([[("worker 0", Hello(0))], [], [("worker 1", Hello(1)),
                                                       ("master", Progress(8, 1))]])
    Coordinator(group, mode, timeout_s=10).run()
    assert mode.seen == [("worker 0", Hello(0)), ("worker 1", Hello(1)),
                         ("master", Progress(8, 1))]
    assert mode.ticks == 3 and mode.finished_called == 1


def test_coordinator_deadline_names_who_is_still_running():
    with pytest.raises(RunTimeout, match="still running: worker 0"):
        Coordinator(FakeGroup([], joins=False), FakeMode(), timeout_s=0.05).run()


def test_coordinator_reports_children_that_do_not_exit():
    mode = FakeMode(until=1)
    with pytest.raises(ChildFailed, match="did not exit after the run finished"):
        Coordinator(FakeGroup([[("worker 0", Hello(0))]], joins=False), mode, 10).run()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_asks_the_mode_to_stop_once_then_raises_interrupted(sig):
    """SIGTERM (a scheduler's preemption) and SIGUSR1 (Slurm's --signal warning) alike."""
    mode = FakeMode(until=99)

    class Signalling(FakeGroup):
        def poll(self, timeout):
            if self.polls == 1:
                os.kill(os.getpid(), sig)
            return super().poll(timeout)

    with pytest.raises(RunInterrupted, match="--resume x.ckpt"):
        Coordinator(Signalling([[], [], []]), mode, timeout_s=10).run()
    assert mode.stops == 1
    assert signal.getsignal(sig) is signal.SIG_DFL  # handler put back


def test_centralized_mode_builds_its_result_from_messages(digits):
    """The real CentralizedMode handlers, fed scripted messages (no processes)."""
    from apam_gossip.runtime.shm import CentralizedMode
    from apam_gossip.task import make_task

    events = []
    cfg = make_cfg(mode="centralized", workers=2, steps=10, evals=1)
    mode = CentralizedMode(cfg, make_task(cfg, digits, check=False), digits, events.append)
    mode.snaps[0].copy_(mode.plan.x0)
    mode.snaps[1].copy_(mode.plan.x0)
    script = [[("master", Snapshot(0, 0.0, 0, 0, None))],
              [("master", Progress(80, 5)), ("worker 1", Died("killed by signal 9"))],
              [("master", Snapshot(1, 1.5, 160, 10, 0.5, final=True)),
               ("master", MasterSummary(1.5, 10, 160, {0: 6, 1: 4}, [10, 0], [160, 0], [1])),
               ("worker 0", WorkerReport(0, "cpu", 0.4, 0.0))]]
    Coordinator(FakeGroup(script), mode, timeout_s=10).run()
    r = mode.result()
    assert r.updates == 10 and r.staleness == {0: 6, 1: 4} and r.failed_workers == [1]
    assert [e.updates for e in r.evals] == [0, 10] and r.evals[-1].train_loss == 0.5
    assert [w.updates for w in r.workers] == [10, 0] and r.workers[0].compute_s == 0.4
    assert torch.equal(r.final_params, mode.plan.x0)
    assert [e.kind for e in events] == ["eval", "progress", "died", "eval"]


def test_one_consensus_distance_over_the_parameters_and_one_over_the_buffers():
    """core.consensus: the parameters' distance ignores the buffers (BatchNorm statistics
    are reported apart, as buffer_consensus; D-PSGD used to mix them into one number),
    and the loop API's form from all-reduced sums is the same quantity."""
    from apam_gossip.core.consensus import consensus, consensus_from_sums, squares

    g = torch.Generator().manual_seed(0)
    xs = torch.randn(4, 10, generator=g)
    xbar, d = consensus(xs, n_params=7)
    want = float(((xs[:, :7] - xs[:, :7].mean(0)) ** 2).sum(1).mean())
    assert d["consensus_distance"] == pytest.approx(want, rel=1e-6)
    moved = xs.clone()
    moved[:, 7:] += torch.randn(4, 3, generator=g) * 100  # only the buffers differ
    _, d2 = consensus(moved, n_params=7)
    assert d2["consensus_distance"] == d["consensus_distance"]
    assert d2["buffer_consensus"] > 100 * d["buffer_consensus"]
    sq = sum(squares(x, 7) for x in xs)
    xbar2, d3 = consensus_from_sums(xs.double().sum(0), float(sq[0]), float(sq[1]), 4, 7)
    assert torch.allclose(xbar2.float(), xbar)
    for k in d:
        assert d3[k] == pytest.approx(d[k], rel=1e-5), k
    assert set(consensus(xs[:, :7], n_params=7)[1]) == {"consensus_distance"}  # no buffers


def test_dpsgd_and_gossip_report_the_same_consensus_on_a_batchnorm_model(digits):
    """Both decentralized modes name the same two distances for a model with buffers."""
    from apam_gossip import run

    from helpers import make_cfg

    for mode in ("dpsgd", "decentralized"):
        r = run(make_cfg(mode=mode, workers=2, steps=20, evals=1,
                         model="user_models:DigitsBN"), dataset=digits)
        assert {"consensus_distance", "buffer_consensus"} <= set(r.evals[-1].extra), mode
