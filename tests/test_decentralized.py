"""Multi-process tier: decentralized gossip with real worker processes."""

from __future__ import annotations

import pytest
import torch

from apam_gossip.config import RunConfig
from apam_gossip.runner import run
from apam_gossip.runtime.shm import gossip_consensus
from apam_gossip.topology import make_topology, validate_topology

from helpers import make_cfg

pytestmark = pytest.mark.timeout(240)


RUN = {"mode": "decentralized", "evals": 3, "data": {"batch_size": 32}, "optim": {"lr": 2e-3}}


def _cfg(**kw) -> RunConfig:
    return make_cfg(RUN, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["complete", "ring"])
def test_gossip_conserves_the_mean_and_reaches_consensus(topology):
    """Learning rate 0 (gossip only), 8 different random models: pairwise averaging is
    doubly stochastic, so the mean stays put and every model converges to it."""
    n, d = 8, 2000
    g = validate_topology(make_topology(topology, n), n)
    x0 = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 += torch.arange(n, dtype=torch.float64)[:, None]  # clearly different models
    mean0 = x0.mean(0)
    dist0 = ((x0 - mean0) ** 2).sum(1).mean()
    x = gossip_consensus(g, x0, averages_per_worker=1000, seed=1)
    rel = ((x.mean(0) - mean0).norm() / mean0.norm()).item()
    assert rel <= 1e-5, f"mean drifted by {rel}"
    dist = ((x - x.mean(0)) ** 2).sum(1).mean()
    assert dist <= 1e-6 * dist0, f"consensus distance {dist} vs initial {dist0}"


@pytest.mark.slow
def test_no_hang_repeated_complete_graph_8_workers(digits):
    """Heavy contention: 8 workers all averaging with each other. Every run must finish
    within its timeout (a deadlock would trip timeout_s and fail the test)."""
    g = validate_topology(make_topology("complete", 8), 8)
    for rep in range(3):
        x0 = torch.randn(8, 50_000, dtype=torch.float32)
        x = gossip_consensus(g, x0, averages_per_worker=300, seed=rep, timeout_s=60)
        assert torch.isfinite(x).all()
    for rep in range(2):
        r = run(_cfg(workers=8, topology="complete", steps=400, seed=rep, timeout_s=90),
                dataset=digits)
        assert r.updates == 400
        assert all(w.updates > 0 for w in r.workers)


@pytest.mark.parametrize("adaptive_state,optim", [
    ("local", {"name": "amsgrad"}),
    pytest.param("tracked", {"name": "amsgrad"}, marks=pytest.mark.slow),
])
def test_ring_of_4_learns_digits(digits, adaptive_state, optim):
    r = run(_cfg(workers=4, topology="ring", epochs=15, adaptive_state=adaptive_state,
                 optim=optim), dataset=digits)
    assert r.mode == "decentralized"
    assert r.final_accuracy >= 0.95, [e.test_acc for e in r.evals]
    # every evaluation point is taken, at (or just past) its update count: during the run
    # only the average model is scored, so the coordinator keeps up
    from apam_gossip.algorithms.common import eval_points

    # (a coordinator descheduled past a point on a loaded machine may merge two)
    want = eval_points(r.updates, r.config["evals"])
    got = [e.updates for e in r.evals]
    assert len(got) >= len(want) - 2 and got == sorted(set(got)), (got, want)
    assert all("worst_worker_acc" not in e.extra for e in r.evals[:-1])
    last = r.evals[-1]
    assert last.extra["worst_worker_acc"] >= 0.9
    assert 0 <= last.extra["consensus_distance"] < 1.0
    assert last.extra["averages"] >= r.updates  # one average per local step
    assert sum(r.staleness.values()) == r.updates


@pytest.mark.slow
def test_plain_sgd_adpsgd_learns(digits):
    r = run(_cfg(workers=4, topology="ring", epochs=15,
                 optim={"name": "sgd", "lr": 0.05, "momentum": 0.9}), dataset=digits)
    assert r.final_accuracy >= 0.9, [e.test_acc for e in r.evals]


def test_single_worker_decentralized_is_sequential(digits):
    """One worker, no neighbors: the gossip loop is plain sequential AMSGrad."""
    dec = run(_cfg(workers=1, steps=100, topology="ring"), dataset=digits)
    seq = run(_cfg(mode="sequential", workers=1, steps=100), dataset=digits)
    assert (dec.final_params - seq.final_params).abs().max().item() <= 1e-6


def test_topology_file_with_wrong_node_count_is_a_user_error(digits):
    from apam_gossip.errors import UserError

    with pytest.raises(UserError, match="8 nodes but there are 4 workers"):
        run(_cfg(workers=4, topology="topologies/ring8.edgelist", steps=10), dataset=digits)


@pytest.mark.parametrize("adaptive_state,overlap", [
    pytest.param("local", True, marks=pytest.mark.slow), ("tracked", True),
    pytest.param("tracked", False, marks=pytest.mark.slow)])
def test_audit_no_local_step_is_lost_to_a_concurrent_average(digits, adaptive_state,
                                                             overlap):
    """sum_i x_i(end) must equal sum_i x_i(0) plus every local step ever applied: an
    average that overwrote a concurrent step (or a dropped step) would break it. With
    overlap the averages run in a second thread while the gradient is computed."""
    r = run(_cfg(workers=4, topology="complete", steps=600, audit=True, overlap=overlap,
                 adaptive_state=adaptive_state, data={"batch_size": 8}), dataset=digits)
    err = r.evals[-1].extra["audit_error"]
    assert err <= 1e-5, f"sum of models is off by a relative {err}"
    assert r.evals[-1].extra["averages"] >= 0.9 * r.updates  # shm never refuses


def test_a_model_big_enough_for_the_fused_average_keeps_the_sum(digits):
    """A 1.1M-parameter model (4.4 MB) takes the fused numba average, compiled in each
    worker process before training: the audit still holds and every step averaged."""
    from apam_gossip.average import FUSED_MIN_NUMEL

    r = run(_cfg(workers=3, topology="complete", steps=60, audit=True,
                 model="user_models:wide_digits_net", evals=1), dataset=digits)
    assert r.n_params >= FUSED_MIN_NUMEL
    assert r.evals[-1].extra["audit_error"] <= 1e-5
    assert r.evals[-1].extra["averages"] == r.updates == 60


def test_overlap_runs_the_average_beside_the_gradient(digits, tmp_path, monkeypatch):
    """AD-PSGD's two threads: with overlap each step's average with a neighbor runs in
    a second thread while the gradient is computed; without, never at the same time.
    Each worker's gradient looks for its average in flight (tests/overlap_probe.py) behind
    an emulated link slow enough to be seen (60 ms there and back); what it sees does
    not depend on the machine's load. The time this saves is the benchmark's to show
    (bench mode decentralized-no-overlap, launch/profile_slow_links.toml). The sum of the
    models is audited under overlap too."""
    from overlap_probe import LOG_ENV

    def seen(overlap: bool, steps: int) -> list[int]:
        log = tmp_path / f"overlap-{overlap}.log"
        monkeypatch.setenv(LOG_ENV, str(log))  # the workers inherit it
        r = run(_cfg(workers=2, topology="complete", steps=steps, audit=True, evals=1,
                     overlap=overlap, model="overlap_probe:overlap_probe_net",
                     network={"latency_ms": 30.0}), dataset=digits)
        assert r.evals[-1].extra["audit_error"] <= 1e-5
        assert r.evals[-1].extra["averages"] == r.updates == steps
        return [int(line) for line in log.read_text().split()]

    overlapped = seen(True, 40)
    assert len(overlapped) == 40
    # every step can see it; a gradient held off the CPU for the whole 60 ms of an
    # average (a heavily loaded machine) misses that one, so a majority is asked for
    assert sum(overlapped) >= 30, overlapped
    # the control: the same probe never sees an average beside a gradient without
    # overlap (short: each of its steps waits the probe's whole watch)
    serial = seen(False, 8)
    assert len(serial) == 8 and sum(serial) == 0, serial


def test_an_average_mixes_the_tracked_second_moment_too():
    """In-process, on the shared-memory transport: x and u of both workers become their
    means, and the versions and the average counter move (a transport that left u out of
    the average would fail here)."""
    from apam_gossip.transport.shm import ShmGossip

    g = ShmGossip(3, 5, tracked=True, dtype=torch.float64)
    g.x.copy_(torch.arange(15, dtype=torch.float64).view(3, 5))
    g.u.copy_(torch.arange(15, dtype=torch.float64).view(3, 5) ** 2)
    x0, u0 = g.x.clone(), g.u.clone()
    g.end(2, 5.0).average_with(0)
    for buf, start in ((g.x, x0), (g.u, u0)):
        mean = (start[0] + start[2]) / 2
        assert torch.equal(buf[0], mean) and torch.equal(buf[2], mean)
        assert torch.equal(buf[1], start[1])
    assert g.versions.tolist() == [1, 0, 1] and int(g.counters[2]) == 1


def test_tracked_run_keeps_the_sum_of_u_equal_to_the_sum_of_vhat(digits):
    """A real tracked run: averages conserve sum_i u_i and each local step moves u_i and
    vhat_i by the same amount, so sum_i u_i(end) == sum_i vhat_i(end) (both start at 0).
    And u really is mixed: the workers' u end up far closer together than their vhat."""
    r = run(_cfg(workers=4, topology="ring", steps=400, audit=True, adaptive_state="tracked",
                 data={"batch_size": 8}), dataset=digits)
    extra = r.evals[-1].extra
    assert extra["audit_u_error"] <= 1e-5, extra
    assert extra["audit_error"] <= 1e-5, extra
    assert extra["u_spread"] < 0.5 * extra["vhat_spread"], extra
