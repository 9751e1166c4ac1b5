"""The simulator's hardware model: nodes and CPU contention, shared and congested NICs,
all-reduce overlapped with the backward pass (apam_gossip.sim.hardware), against hand
computations; the contention micro-benchmark with real processes."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from apam_gossip.config import ConfigError, RunConfig
from apam_gossip.profiles import _sim_costs
from apam_gossip.sim import simulate
from apam_gossip.sim.cluster import Cluster
from apam_gossip.sim.engine import Engine, Resource
from apam_gossip.sim.hardware import Congestion, Hardware, Node


def _node_finish(works: list[float], curve: tuple[float, ...], starts=None) -> list[float]:
    eng = Engine()
    node = Node(eng, Hardware(contention=curve).factor)
    out = [0.0] * len(works)
    for i, w in enumerate(works):
        def go(i=i, w=w):
            node.run(w, lambda dt, i=i: out.__setitem__(i, eng.now))
        eng.at(starts[i] if starts else 0.0, go)
    eng.run()
    return out


def test_node_shares_its_cores_as_processor_sharing():
    # two equal jobs at factor 2: both end at 2 s
    assert _node_finish([1.0, 1.0], (1.0, 2.0)) == pytest.approx([2.0, 2.0])
    # 1 s and 3 s at factor 1.5 together: the short one ends at 1.5 s, the long one has
    # 2 s of work left alone: 3.5 s
    assert _node_finish([1.0, 3.0], (1.0, 1.5)) == pytest.approx([1.5, 3.5])
    # a job that joins later slows the running one only from then on
    assert _node_finish([2.0, 1.0], (1.0, 2.0), starts=[0.0, 1.0]) == pytest.approx([3.0, 3.0])


def test_contention_factor_extrapolates_past_the_curve_and_the_cores():
    hw = Hardware(contention=(1.0, 1.2), cores_per_node=4)
    assert [hw.factor(k) for k in (1, 2, 3, 4)] == [1.0, 1.2, 1.2, 1.2]
    assert hw.factor(8) == pytest.approx(2.4)  # 8 processes time-share 4 cores
    assert Hardware(contention=(1.0, 1.1)).factor(4) == pytest.approx(2.2)
    assert Hardware().factor(64) == 1.0  # no curve: nothing is shared


@pytest.mark.parametrize("seed", range(5))
def test_lockstep_rounds_closed_form_equals_the_event_model(seed):
    rng = random.Random(seed)
    works = [rng.uniform(0.1, 2.0) for _ in range(7)]
    curve = (1.0, 1.3, 1.5)
    cl = Cluster(7, [1.0] * 7, [1.0] * 7, 0.0, 1.0, None, 4, 0.0, 0.0,
                 hardware=Hardware(contention=curve, workers_per_node=7))
    closed = cl.round_s([(w, 1.0) for w in works])
    assert closed == pytest.approx(_node_finish(works, curve))


@pytest.mark.parametrize("bad", [
    {"contention": [1.2, 1.5]}, {"contention": "guess"}, {"workers_per_node": 0},
    {"background": 1.0}, {"congestion": -0.1}, {"congestion_keep": 0},
    {"allreduce_overlap": "yes"}, {"bucket_mb": 0}, {"intra_node_gbps": -1},
    {"contention": 1.5}, {"contention": {"a": 1}}, {"cores_per_node": -1},
    {"nic_per_worker": 1},
])
def test_bad_hardware_keys_are_one_line_config_errors(bad):
    with pytest.raises(ConfigError, match=r"\[simulate\] " + next(iter(bad))):
        _sim_costs(bad)


def test_congestion_episodes_take_their_share_of_the_time():
    c = Congestion(Hardware(congestion=0.2, congestion_s=0.5, congestion_keep=0.25,
                            background=0.5), seed=3)
    ts = [k * 0.01 for k in range(200_000)]  # 2,000 s
    keeps = [c.keep(4, t) for t in ts]
    assert set(keeps) == {0.5, 0.125}  # background always; congestion on top
    assert sum(k == 0.125 for k in keeps) / len(keeps) == pytest.approx(0.2, abs=0.03)
    assert [c.keep(4, t) for t in ts[:500]] == keeps[:500]  # a timeline, not redrawn


def _cfg(mode: str, workers: int, **net) -> RunConfig:
    return RunConfig.from_dict({"mode": mode, "workers": workers, "model": "mlp",
                                "steps": 40 * workers, "evals": 1,
                                "network": {"latency_ms": 0.0, "bandwidth_gbps": 0.0, **net},
                                "data": {"dataset": "digits"}})


def _sim(cfg, hw=None, **kw):
    return simulate(cfg, timing_only=True, gradient_s=0.01, master_update_s=1e-4,
                    worker_update_s=0.0, gradient_cv=0.0, hardware=hw, **kw)


def test_eight_workers_on_two_cores_take_four_times_as_long():
    base = _sim(_cfg("allreduce", 8))
    hw = Hardware(workers_per_node=8, cores_per_node=2, contention=(1.0, 1.0))
    shared = _sim(_cfg("allreduce", 8), hw)
    assert shared.wall_time == pytest.approx(4 * base.wall_time)
    # gossip's workers contend the same way while they compute
    g0, g1 = _sim(_cfg("decentralized", 8)), _sim(_cfg("decentralized", 8), hw)
    assert g1.wall_time == pytest.approx(4 * g0.wall_time, rel=0.05)


def test_a_master_on_the_workers_node_competes_for_its_cores():
    hw = Hardware(workers_per_node=4, cores_per_node=2, contention=(1.0, 1.0))
    kw = dict(timing_only=True, gradient_s=0.01, master_update_s=1.5e-3, worker_update_s=0.0,
              gradient_cv=0.0)
    own = simulate(_cfg("centralized", 4), hardware=hw, **kw).wall_time
    shared = Hardware(workers_per_node=4, cores_per_node=2, contention=(1.0, 1.0),
                      master_shares_node=True)
    # the master takes its share of the 2 cores whenever it applies: gradients slow
    assert simulate(_cfg("centralized", 4), hardware=shared, **kw).wall_time > 1.03 * own


@pytest.mark.parametrize("mode", ["centralized", "decentralized", "allreduce", "syncps"])
def test_evaluations_during_the_run_load_the_coordinators_node(mode, monkeypatch):
    """On one machine the coordinator evaluates beside the workers: with the master's node
    shared, more evaluation points make the run longer; on a node of its own, or for a
    model_params model (whose evaluation is not the task model's), nothing changes."""
    import apam_gossip.sim.run as sim_run

    # syncps times its shares on the model: a fixed timing, so that runs compare exactly
    monkeypatch.setattr(sim_run, "calibrate",
                        lambda task, data, cfg: (1e-3 + 1e-4 * cfg.data.batch_size, 1e-4))
    # an evaluation's measured time, where one is charged, fixed too: on a fast machine
    # the real one is too short against a gradient for the difference to show
    real_eval_s = sim_run._eval_s
    monkeypatch.setattr(sim_run, "_eval_s",
                        lambda *a: 5e-3 if real_eval_s(*a) > 0 else 0.0)
    shared = Hardware(workers_per_node=4, cores_per_node=2, contention=(1.0, 1.2),
                      master_shares_node=True)
    kw = dict(timing_only=True, gradient_s=0.002, master_update_s=1e-4, worker_update_s=0.0,
              gradient_cv=0.0)

    def wall(hw, evals, **more):
        return simulate(_cfg(mode, 4).replace(evals=evals), hardware=hw, **kw,
                        **more).wall_time

    assert wall(shared, 20) > 1.02 * wall(shared, 1)
    own = Hardware(workers_per_node=4, cores_per_node=2, contention=(1.0, 1.2))
    assert wall(own, 20) == wall(own, 1)
    assert wall(shared, 20, model_params=10**5) == wall(shared, 1, model_params=10**5)


def test_lockstep_rounds_share_the_node_with_an_evaluation_beside_them():
    cl = Cluster(2, [1.0, 1.0], [1.0, 1.0], 0.0, 1.0, None, 1000, 0.0, 0.0,
                 hardware=Hardware(workers_per_node=2, cores_per_node=1, contention=(1.0,),
                                   master_shares_node=True))
    # 2 workers and an evaluation of 0.5 s on one core: all three at a third of the speed
    # until the evaluation ends at 1.5 s, then the two workers at half: 1.5 + 0.5 x 2
    assert cl.round_s([(1.0, 1.0), (1.0, 1.0)], [0.5]) == pytest.approx([2.5, 2.5])
    assert cl.round_s([(1.0, 1.0), (1.0, 1.0)]) == pytest.approx([2.0, 2.0])


def test_default_hardware_is_the_simulator_as_it_was():
    cfg = _cfg("decentralized", 6, latency_ms=1.0, bandwidth_gbps=1.0)
    a = simulate(cfg, timing_only=True, gradient_s=0.01, master_update_s=1e-4,
                 worker_update_s=1e-4)
    b = simulate(cfg, timing_only=True, gradient_s=0.01, master_update_s=1e-4,
                 worker_update_s=1e-4, hardware=Hardware())
    assert a.wall_time == b.wall_time and a.samples == b.samples


def test_congestion_slows_allreduce_far_more_than_gossip():
    """The ring waits for its slowest hop; a gossip pair only for its own two NICs.

    A 1M-parameter model on 10 Gb/s: a gossip exchange (3 ms) is far shorter than a
    gradient (50 ms), as in AD-PSGD's setting; each NIC is congested 5% of the time."""
    net = {"latency_ms": 0.05, "bandwidth_gbps": 10.0}
    hw = Hardware(congestion=0.05, congestion_s=0.2, congestion_keep=0.02)
    big = {"model_params": 1_000_000}
    ratios = {}
    for mode in ("allreduce", "decentralized"):
        cfg = _cfg(mode, 32, **net)
        calm = simulate(cfg, timing_only=True, gradient_s=0.05, master_update_s=1e-3,
                        worker_update_s=1e-3, **big)
        busy = simulate(cfg, timing_only=True, gradient_s=0.05, master_update_s=1e-3,
                        worker_update_s=1e-3, hardware=hw, **big)
        ratios[mode] = busy.wall_time / calm.wall_time
    assert ratios["allreduce"] > 2.5 and ratios["decentralized"] < 1.4  # 3.8 and 1.2


def test_bucketed_allreduce_hides_behind_the_backward_pass():
    cl = Cluster(4, [1.0] * 4, [1.0] * 4, 0.0, 1.0, None, 100_000_000, 0.0, 0.0,
                 hardware=Hardware(allreduce_overlap=True))  # 100 MB: 4 buckets of 25 MB
    assert cl.overlapped_round_s(1.0, 0.4) == pytest.approx(1.1)  # last bucket only
    assert cl.overlapped_round_s(1.0, 2.0) == pytest.approx(1 / 3 + 2.0)  # comm-bound
    cfg = _cfg("allreduce", 8, latency_ms=0.05, bandwidth_gbps=10.0)
    kw = dict(timing_only=True, gradient_s=0.2, master_update_s=1e-3, worker_update_s=0.0,
              gradient_cv=0.0, model_params=25_000_000)
    plain = simulate(cfg, **kw).wall_time
    hidden = simulate(cfg, hardware=Hardware(allreduce_overlap=True), **kw).wall_time
    assert hidden < plain


def test_workers_behind_one_nic_share_it():
    cfg = _cfg("centralized", 8, latency_ms=0.0, bandwidth_gbps=1.0)
    kw = dict(timing_only=True, gradient_s=0.01, master_update_s=1e-5, worker_update_s=0.0,
              gradient_cv=0.0, model_params=1_000_000)
    one_each = simulate(cfg, **kw).wall_time
    # 8 workers behind one NIC of 1 Gb/s: their uploads queue there as well as at the master
    four_nodes = simulate(cfg, hardware=Hardware(workers_per_node=4), **kw).wall_time
    assert four_nodes >= one_each
    r = Resource()
    assert r.serve(0.0, 1.0) == 1.0


def test_measured_contention_runs_real_co_running_workers():
    from apam_gossip.data import load_dataset
    from apam_gossip.sim.contention import curve, measure_contention
    from apam_gossip.task import make_task

    cfg = _cfg("sequential", 1)
    data = load_dataset("digits")
    rows = measure_contention(cfg, make_task(cfg, data, check=False), data, 2, seconds=0.3,
                              timeout=120)
    assert [r["workers"] for r in rows] == [1, 2] and rows[0]["factor"] == 1.0
    assert all(r["batch_s"] > 0 for r in rows)
    c = curve(rows)
    assert c[0] == 1.0 and len(c) == 2 and c[1] >= 1.0


def test_bench_contention_prints_the_curve_and_a_bad_flag_is_one_line():
    cmd = [sys.executable, "-m", "apam_gossip", "bench", "contention", "--max-workers", "1",
           "--seconds", "0.2", "--train-args", "--model mlp --dataset digits"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "[simulate] contention = [1.0]" in p.stdout
    p = subprocess.run(cmd[:-4] + ["--seconds", "0"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--seconds" in p.stderr
    p = subprocess.run(cmd[:5] + ["--max-workers", "0"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--max-workers" in p.stderr


def test_cores_alone_time_share_them():
    """cores_per_node without a curve: no contention below the cores, time-sharing past
    them (8 workers on 2 cores: 4x as long as on their own cores)."""
    hw = Hardware(workers_per_node=8, cores_per_node=2)
    assert hw.contended and hw.factor(2) == 1.0 and hw.factor(8) == 4.0
    cfg = _cfg("allreduce", 8)
    assert _sim(cfg, hw).wall_time == pytest.approx(4 * _sim(cfg).wall_time)
