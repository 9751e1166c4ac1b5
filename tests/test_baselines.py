"""Synchronous baselines and heterogeneity emulation (stragglers, slow links)."""

from __future__ import annotations

import time

import networkx as nx
import pytest
import torch

from apam_gossip.algorithms.common import LocalWorker
from apam_gossip.config import NetworkConfig
from apam_gossip.data import partition
from apam_gossip.emulation import MASTER, LinkModel
from apam_gossip.optim import Optimizer
from apam_gossip.runner import run
from apam_gossip.task import make_task
from apam_gossip.topology import make_topology, metropolis_hastings_weights

from helpers import make_cfg

pytestmark = pytest.mark.timeout(180)


def test_allreduce_equals_an_in_process_simulation(digits):
    """4 processes with all-reduce == one process averaging the 4 workers' gradients."""
    cfg = make_cfg(mode="allreduce", workers=4, steps=120)
    r = run(cfg, dataset=digits)
    assert r.updates == 30 and r.samples == 120 * 16
    torch.set_num_threads(1)
    shards = partition(digits.y_train, 4, "iid", 0.5, cfg.seed)
    task = make_task(cfg, digits, check=False)
    ws = [LocalWorker.build(cfg, task, digits, shards[i], i, torch.device("cpu"))
          for i in range(4)]
    x, _ = task.initial_state()
    opt = Optimizer(cfg.optim)
    st = opt.init(x)
    for _ in range(30):
        gs = []
        for w in ws:
            w.flat.params.copy_(x)
            w.gradient()
            gs.append(w.flat.grads.clone())
        opt.update(x, torch.stack(gs).mean(0), st)
    diff = (r.final_params - x).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("mode", ["allreduce", "dpsgd"])
def test_one_worker_sync_equals_sequential(digits, mode):
    a = run(make_cfg(mode=mode, workers=1, steps=60), dataset=digits)
    s = run(make_cfg(mode="sequential", workers=1, steps=60), dataset=digits)
    assert (a.final_params - s.final_params).abs().max().item() <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["allreduce", "dpsgd"])
def test_sync_baselines_learn_digits(digits, mode):
    r = run(make_cfg(mode=mode, workers=4, epochs=15, evals=3, optim={"lr": 2e-3},
                 data={"batch_size": 32}), dataset=digits)
    assert r.final_accuracy >= 0.93, [e.test_acc for e in r.evals]
    if mode == "dpsgd":
        assert r.evals[-1].extra["consensus_distance"] < 0.1


@pytest.mark.slow
def test_async_sgd_is_the_centralized_mode_with_sgd(digits):
    """Asynchronous SGD through the APAM master learns. The step is small enough for the
    staleness of 3 workers on a loaded 2-core machine: with lr 0.05 and momentum 0.9 (an
    effective step of 0.5) 3 of 5 seeds diverged to chance (10%); with lr 0.02 five
    seeds reached 97.2-98.1%."""
    r = run(make_cfg(mode="centralized", workers=3, epochs=10, optim={"name": "sgd", "lr": 0.02,
                                                                   "momentum": 0.9}),
            dataset=digits)
    assert r.final_accuracy >= 0.9, [e.test_acc for e in r.evals]
    assert r.config["optim"]["name"] == "sgd" and max(r.staleness) >= 1


@pytest.mark.parametrize("topology", ["ring", "complete", "star", "exponential"])
def test_metropolis_hastings_weights_are_doubly_stochastic(topology):
    g = make_topology(topology, 8)
    w = metropolis_hastings_weights(g)
    m = torch.zeros(8, 8, dtype=torch.float64)
    for i, pairs in w.items():
        for j, v in pairs:
            m[i, j] = v
    assert torch.allclose(m, m.T)
    assert torch.allclose(m.sum(0), torch.ones(8, dtype=torch.float64))
    assert (m >= 0).all()
    assert nx.is_connected(g)


def test_link_model():
    net = NetworkConfig(latency_ms=1.0, bandwidth_gbps=8.0, worker_latency_ms=(0.0, 4.0),
                        worker_bandwidth_gbps=(0.0, 0.8), links=((0, 2, 10.0, 0.0),))
    lm = LinkModel(net, nbytes=10**6)
    assert lm.seconds(0, 3) == pytest.approx(1e-3 + 8e6 / 8e9)
    assert lm.seconds(1, MASTER) == pytest.approx(5e-3 + 8e6 / 0.8e9)  # slow NIC of worker 1
    assert lm.seconds(2, 0) == pytest.approx(10e-3)  # explicit link override, unlimited bw
    assert lm.allreduce_seconds(4) == pytest.approx(6 * lm.seconds(1, 2, 250_000))
    assert LinkModel(NetworkConfig(), 10**6).seconds(0, 1) == 0.0


def test_random_straggler_sleeps(digits):
    cfg = make_cfg(straggler_prob=1.0, straggler_factor=4.0)
    w = LocalWorker.build(cfg, make_task(cfg, digits, check=False), digits,
                          torch.arange(200), 0, torch.device("cpu"))
    for _ in range(5):
        w.gradient()
    assert w.sleep_s == pytest.approx(3 * w.compute_s, rel=1e-6)
    cfg = make_cfg(straggler_prob=0.0, straggler_factor=4.0)
    w = LocalWorker.build(cfg, make_task(cfg, digits, check=False), digits,
                          torch.arange(200), 0, torch.device("cpu"))
    w.gradient()
    assert w.sleep_s == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["centralized", "decentralized", "allreduce", "dpsgd",
                                  "syncps"])
def test_slow_links_slow_every_mode(digits, mode):
    fast = run(make_cfg(mode=mode, workers=2, steps=40), dataset=digits)
    slow_cfg = make_cfg(mode=mode, workers=2, steps=40, network={"latency_ms": 25.0})
    t = time.monotonic()
    slow = run(slow_cfg, dataset=digits)
    assert time.monotonic() - t > 0.4
    # every mode pays at least ~20 one-way link latencies along its critical path
    assert slow.wall_time > fast.wall_time + 20 * 0.025 * 0.8, (fast.wall_time, slow.wall_time)
