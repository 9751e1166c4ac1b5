"""The simulator (apam_gossip.sim): exact where it must be, reproducible, and its CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apam_gossip import run
from apam_gossip.sim import simulate
from apam_gossip.sim.cluster import Cluster
from apam_gossip.sim.engine import Engine, Resource

from helpers import make_cfg

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.timeout(300)
COSTS = {"gradient_s": 1e-3, "master_update_s": 1e-4, "worker_update_s": 1e-4}


def test_engine_orders_events_by_time_then_schedule_order():
    eng, seen = Engine(), []
    eng.at(2.0, lambda: seen.append("c"))
    eng.at(1.0, lambda: seen.append("a"))
    eng.at(1.0, lambda: (seen.append("b"), eng.after(0.5, lambda: seen.append("b2"))))
    eng.run()
    assert seen == ["a", "b", "b2", "c"] and eng.now == 2.0 and eng.events == 4
    nic = Resource()
    assert nic.serve(0.0, 1.0) == 1.0 and nic.serve(0.5, 1.0) == 2.0  # queued behind
    assert nic.serve(5.0, 1.0) == 6.0 and nic.busy_s == 3.0
    assert nic.busy_until(5.5) == 2.5 and nic.busy_until(9.0) == 3.0


def test_a_shared_nic_queues_concurrent_transfers():
    cfg = make_cfg(workers=2, network={"latency_ms": 1.0, "bandwidth_gbps": 8e-6})  # 1 kB/s
    cl = Cluster.of(cfg, 250, *COSTS.values())  # 1,000 bytes: 1 s on the wire
    assert cl.transfer(0.0, 0, 1) == pytest.approx(1.001)
    assert cl.transfer(0.0, 0, 1) == pytest.approx(2.001)  # behind the first on both NICs


def test_nics_are_full_duplex_and_the_master_nic_is_shared():
    """Sends and receives of one node do not queue on each other; every worker's upload
    queues on the master's incoming NIC, capped by master_bandwidth_gbps alone."""
    cfg = make_cfg(workers=3, network={"master_bandwidth_gbps": 8e-6})  # the master: 1 kB/s
    cl = Cluster.of(cfg, 250, *COSTS.values())  # 1,000 bytes
    assert cl.transfer(0.0, 0, 1) == 0.0  # worker links are unlimited
    assert cl.transfer(0.0, 0, -1) == pytest.approx(1.0)
    assert cl.transfer(0.0, 1, -1) == pytest.approx(2.0)  # queued on the master's "in"
    assert cl.transfer(0.0, -1, 2) == pytest.approx(1.0)  # its "out" is free: full duplex
    assert cl.transfer(0.5, -1, 0) == pytest.approx(2.0)
    duplex = Cluster.of(make_cfg(workers=2, network={"bandwidth_gbps": 8e-6}), 250,
                        *COSTS.values())
    assert duplex.transfer(0.0, 0, 1) == duplex.transfer(0.0, 1, 0) == pytest.approx(1.0)
    # the master's NIC 100x the links': four uploads at once each take the link's 1 s;
    # at the links' speed, they queue
    for cap, arrivals in ((8e-4, [1.0] * 4), (8e-6, [1.0, 2.0, 3.0, 4.0])):
        cl = Cluster.of(make_cfg(workers=4, network={"bandwidth_gbps": 8e-6,
                                                     "master_bandwidth_gbps": cap}),
                        250, *COSTS.values())
        got = [cl.transfer(0.0, i, -1) for i in range(4)]
        assert got == pytest.approx(arrivals, rel=0.02)


def test_profiles_with_per_worker_links_simulate_and_scale(tmp_path):
    """A profile's per-worker network lists and single links: calibration and the
    sequential mode run on one worker without them; scaling keeps the links that exist."""
    from apam_gossip.profiles import load_profile, scaled

    p = subprocess.run([sys.executable, "-m", "apam_gossip", "simulate",
                        str(ROOT / "launch" / "profile_slow_links.toml"), "--smoke",
                        "--timing-only", "-q", "-o", str(tmp_path / "s.json")],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    prof = load_profile(ROOT / "launch" / "profile_slow_links.toml")
    assert [r["mode"] for r in rows] == list(prof.modes)
    seq = simulate(prof.base.replace(mode="sequential", steps=20), timing_only=True, **COSTS)
    assert seq.updates == 20
    assert scaled(prof, 8).base.network.links == prof.base.network.links  # (0, 1) stays
    assert scaled(prof, 1).base.network.links == ()  # worker 1 is gone


def test_sizes_past_a_real_run_and_flags_that_do_not_apply(tmp_path):
    from apam_gossip.config import ConfigError

    big = make_cfg(mode="decentralized", workers=5000, steps=10)
    with pytest.raises(ConfigError, match="more than a real run takes"):
        run(big)
    prof = str(ROOT / "launch" / "study" / "one_slow_in_8.toml")
    for args, needle in ((["--scale", "2,5000"], "exceeds the 1437 training samples"),
                         (["--scale", "2", "--seeds", "2"], "--seeds does not apply"),
                         (["--scale", "2", "--workers", "4"], "--workers does not apply")):
        p = subprocess.run([sys.executable, "-m", "apam_gossip", "simulate", prof, "--smoke",
                            *args, "-o", str(tmp_path / "x.json")],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and needle in p.stderr, p.stderr
        assert not (tmp_path / "x.json").exists()
    p = subprocess.run([sys.executable, "-m", "apam_gossip", "bench", prof, "--smoke",
                        "--gradient-ms", "1"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--gradient-ms is a simulator flag" in p.stderr, p.stderr


def test_a_master_nic_cap_slows_centralized_only(digits):
    """A 10x slower master NIC: APAM's throughput drops to what the NIC carries, gossip
    (no master) is untouched."""
    net = {"bandwidth_gbps": 1.0, "master_bandwidth_gbps": 0.01}
    kw = {"workers": 8, "steps": 2000, "evals": 1}
    runs = {}
    for mode in ("centralized", "decentralized"):
        capped = simulate(make_cfg(kw, mode=mode, network=net), dataset=digits,
                          timing_only=True, **COSTS)
        free = simulate(make_cfg(kw, mode=mode, network={"bandwidth_gbps": 1.0}),
                        dataset=digits, timing_only=True, **COSTS)
        runs[mode] = capped.samples_per_s / free.samples_per_s
        if mode == "centralized":  # each update: the gradient in, through the master NIC
            seconds_in = capped.n_params * 4 * 8 / 1e7
            assert capped.updates / capped.wall_time == pytest.approx(1 / seconds_in, rel=0.05)
    assert runs["centralized"] < 0.5 and runs["decentralized"] == 1.0


def test_given_costs_the_model_size_and_the_profile_simulate_table(digits, monkeypatch,
                                                                   tmp_path):
    """The timed optimizer step scales with model_params; a profile's [simulate] table gives
    the costs (bad keys: one clear error)."""
    import apam_gossip.sim.run as sim_run
    from apam_gossip.config import ConfigError
    from apam_gossip.profiles import load_profile

    monkeypatch.setattr(sim_run, "calibrate", lambda *a, **k: (2e-3, 1e-4))
    cfg = make_cfg(mode="centralized", workers=4, steps=50, evals=1)
    r = simulate(cfg, dataset=digits, timing_only=True, gradient_s=5e-3, model_params=10**6)
    n = r.n_params
    assert r.simulation["gradient_s"] == 5e-3
    assert r.simulation["master_update_s"] == pytest.approx(1e-4 * 10**6 / n)
    with pytest.raises(ConfigError, match="model_params needs gradient_s"):
        simulate(cfg, dataset=digits, timing_only=True, model_params=10**6)
    # one gradient time per worker, repeating: workers 1 and 3 are 10x slower
    per = simulate(cfg.replace(steps=2000), dataset=digits, timing_only=True,
                   gradient_s=[1e-3, 1e-2], master_update_s=1e-5, gradient_cv=0.0)
    ups = [w.updates for w in per.workers]
    assert ups[0] == pytest.approx(10 * ups[1], rel=0.1)
    assert ups[2] == pytest.approx(ups[0], rel=0.02)
    with pytest.raises(ConfigError, match="gradient_s must be seconds > 0"):
        simulate(cfg, dataset=digits, timing_only=True, gradient_s=[1e-3, -1])
    base = (ROOT / "launch" / "profile_one_slow_worker.toml").read_text()
    good = tmp_path / "p.toml"
    good.write_text(base + "\n[simulate]\ngradient_ms = 10\nmodel_params = 1000000\n")
    assert load_profile(good).sim_costs == {"gradient_s": 0.01, "model_params": 10**6}
    good.write_text(base + "\n[simulate]\ngradient_ms = [5, 5, 5, 5, 5, 5, 5, 50]\n"
                    "gradient_cv = 0\n")
    assert load_profile(good).sim_costs == {"gradient_s": [0.005] * 7 + [0.05],
                                            "gradient_cv": 0.0}
    for extra, needle in (("gradient_s = 1", "unknown [simulate] key 'gradient_s'"),
                          ("gradient_ms = -1", "gradient_ms must be milliseconds > 0"),
                          ("model_params = 5", "model_params needs gradient_ms"),
                          ("gradient_ms = 5\nmodel_params = 1.5", "whole number"),
                          ("gradient_ms = [5, 50]", "has 2 entries; give one, or one per "
                           "worker (8)")):
        bad = tmp_path / "bad.toml"
        bad.write_text(base + f"\n[simulate]\n{extra}\n")
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_profile(bad)


@pytest.mark.parametrize("mode", ["centralized", "decentralized", "allreduce", "dpsgd",
                                  "sequential", "syncps"])
def test_one_simulated_worker_is_the_sequential_run(digits, mode):
    """Math mode runs the real model, batches and optimizer: 1 worker in any mode is the
    real sequential run, bit for bit (one torch thread in both)."""
    kw = {"workers": 1, "steps": 150, "evals": 3, "threads_per_worker": 1,
          "data": {"augment": "hflip"}}  # the same flips too
    seq = run(make_cfg(kw, mode="sequential"), dataset=digits)
    sim = simulate(make_cfg(kw, mode=mode), dataset=digits, **COSTS)
    assert torch.equal(sim.final_params, seq.final_params)
    assert [e.test_metric for e in sim.evals] == [e.test_metric for e in seq.evals]
    assert sim.simulated and sim.transport == "simulated" and sim.updates == 150


def test_gossip_alone_conserves_the_mean_and_reaches_consensus(digits):
    """lr ~ 0 from 6 different starts on a ring: averaging keeps the mean of the models
    and drives them together."""
    cfg = make_cfg(mode="decentralized", workers=6, steps=3000, evals=2, topology="ring",
                   optim={"lr": 1e-12})
    probe = simulate(cfg.replace(steps=1), dataset=digits, **COSTS)
    n = probe.final_params.numel()
    starts = torch.randn(6, n, generator=torch.Generator().manual_seed(0))
    r = simulate(cfg, dataset=digits, initial_models=starts, **COSTS)
    assert (r.final_params - starts.mean(0)).abs().max() <= 1e-6
    first, last = r.evals[0].extra["consensus_distance"], r.evals[-1].extra["consensus_distance"]
    assert first > 1e3 and last <= 1e-6 * first


@pytest.mark.slow
def test_simulated_allreduce_is_the_real_allreduce(digits):
    """The same batches: the simulated all-reduce's model is the real one's (2 workers,
    real processes)."""
    kw = {"mode": "allreduce", "workers": 2, "steps": 80, "evals": 1, "threads_per_worker": 1}
    real = run(make_cfg(kw), dataset=digits)
    sim = simulate(make_cfg(kw), dataset=digits, **COSTS)
    assert (sim.final_params - real.final_params).abs().max() <= 1e-6


def test_simulated_dpsgd_is_the_real_dpsgd_bit_for_bit(digits):
    """D-PSGD's mix is one arithmetic (apam_gossip.average.mix_into) that the transports
    and the simulator both run: 3 workers on a ring, real processes, the same models and
    consensus distances to the last bit."""
    kw = {"mode": "dpsgd", "workers": 3, "steps": 60, "evals": 2, "topology": "ring",
          "threads_per_worker": 1}
    real = run(make_cfg(kw), dataset=digits)
    sim = simulate(make_cfg(kw), dataset=digits, **COSTS)
    assert torch.equal(sim.final_params, real.final_params)
    assert [e.extra["consensus_distance"] for e in sim.evals] == \
        [e.extra["consensus_distance"] for e in real.evals]


def test_simulated_syncps_is_the_real_syncps_bit_for_bit(digits):
    """3 workers on uneven shares of B = 20 (7, 7, 6), a model with BatchNorm buffers, real
    processes: the simulated master's weighted mean and step are the real one's, and so are
    the models, losses and per-worker samples."""
    kw = {"mode": "syncps", "workers": 3, "steps": 40, "evals": 2,
          "model": "user_models:DigitsBNNoDropout", "data": {"batch_size": 20},
          "threads_per_worker": 1}
    real = run(make_cfg(kw), dataset=digits, quiet=True)
    sim = simulate(make_cfg(kw), dataset=digits, **COSTS)
    assert torch.equal(sim.final_params, real.final_params)
    assert [(e.updates, e.samples, e.test_loss, e.train_loss) for e in sim.evals] == \
        [(e.updates, e.samples, e.test_loss, e.train_loss) for e in real.evals]
    assert [w.samples for w in sim.workers] == [w.samples for w in real.workers] == \
        [40 * b for b in (7, 7, 6)]
    assert sim.staleness == real.staleness == {0: 40}


def test_simulated_syncps_steps_wait_for_the_slowest_share(digits, monkeypatch):
    """Each step is the master's broadcast, the slowest worker's gradient on its share,
    the upload and the master's mean and step: with no network, exactly the sum. A
    share's gradient time is the given one scaled by the model's timed t(share) / t(B),
    not prorated (the timing here replaced by an affine one: 1 ms + 0.1 ms per sample)."""
    import apam_gossip.sim.run as sim_run
    from apam_gossip.sim.run import MEAN_PASS

    monkeypatch.setattr(sim_run, "calibrate",
                        lambda task, data, cfg: (1e-3 + 1e-4 * cfg.data.batch_size, 1e-4))
    cfg = make_cfg(mode="syncps", workers=4, steps=50, evals=1, slowdown=[1, 1, 1, 3],
                   data={"batch_size": 32})
    r = simulate(cfg, dataset=digits, timing_only=True, gradient_cv=0.0, **COSTS)
    g = r.simulation["gradient_s"]
    share = COSTS["gradient_s"] * (1e-3 + 8e-4) / (1e-3 + 32e-4)  # 8 of 32 samples
    assert g == pytest.approx([share] * 4)  # not a quarter of the batch's time
    step = 3 * share + COSTS["master_update_s"] * (1 + MEAN_PASS * 4)
    assert r.wall_time == pytest.approx(50 * step)
    one = simulate(cfg.replace(workers=1, slowdown=[1]), dataset=digits, timing_only=True,
                   gradient_cv=0.0, **COSTS)
    assert one.simulation["gradient_s"] == [COSTS["gradient_s"]]  # B alone: as given
    # not given: each share timed on the model itself
    timed = simulate(cfg, dataset=digits, timing_only=True, gradient_cv=0.0,
                     master_update_s=1e-4, worker_update_s=1e-4)
    assert timed.simulation["gradient_s"] == pytest.approx([1e-3 + 8e-4] * 4)


def test_a_seed_makes_a_simulation_reproducible_and_a_slow_worker_shows(digits):
    cfg = make_cfg(mode="centralized", workers=4, epochs=3, evals=2, slowdown=[1, 1, 1, 10],
                   straggler_prob=0.1, straggler_factor=5.0)
    a = simulate(cfg, dataset=digits, **COSTS)
    b = simulate(cfg, dataset=digits, **COSTS)
    assert torch.equal(a.final_params, b.final_params) and a.wall_time == b.wall_time
    assert a.staleness == b.staleness
    ups = [w.updates for w in a.workers]
    assert min(ups[:3]) >= 5 * ups[3]  # the master keeps serving the fast ones
    c = simulate(cfg.replace(seed=1), dataset=digits, **COSTS)
    assert c.wall_time != a.wall_time


def test_timing_only_scales_to_many_workers(digits):
    cfg = make_cfg(mode="centralized", workers=512, steps=20_000, evals=1)
    r = simulate(cfg, dataset=digits, timing_only=True, **COSTS)
    assert r.updates == 20_000 and r.final_params is None
    # 512 workers, each waiting for 511 others' updates: staleness ~ n - 1
    assert 400 <= r.staleness_mean() <= 520
    # the master (0.1 ms a step) is the bottleneck: ~10,000 updates per virtual second
    assert r.updates / r.wall_time == pytest.approx(1e4, rel=0.05)
    assert 0.95 <= r.evals[-1].extra["master_busy"] <= 1.0  # saturated, never past 100%
    g = simulate(cfg.replace(mode="decentralized", topology="ring"), dataset=digits,
                 timing_only=True, **COSTS)
    assert g.updates == 20_000 and g.wall_time < r.wall_time  # no master to queue on


@pytest.mark.slow
def test_simulate_cli_writes_results_that_compare_reads(tmp_path):
    out = tmp_path / "sim.json"
    p = subprocess.run([sys.executable, "-m", "apam_gossip", "simulate",
                        str(ROOT / "launch" / "profile_one_slow_worker.toml"), "--smoke",
                        "--workers", "16", "--modes", "centralized,decentralized",
                        "--gradient-ms", "1", "--master-ms", "0.1", "-q", "-o", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    assert "simulated (math), 16 workers" in p.stdout
    d = json.loads(out.read_text())
    assert d["simulated"] is True and [r["workers"] for r in d["rows"]] == [16, 16]
    cen = d["runs"]["centralized"]
    assert cen["transport"] == "simulated" and cen["simulation"]["gradient_s"] == 1e-3
    slow = [w["updates"] for w in cen["workers"]]
    assert slow[7] < min(slow[:7]) and slow[15] < min(slow[8:15])  # one slow in 8, tiled
    res = tmp_path / "cen.json"
    res.write_text(json.dumps(cen))
    q = subprocess.run([sys.executable, "-m", "apam_gossip", "compare", "--results", str(res),
                        "--target", "0.5"], capture_output=True, text=True, timeout=60)
    assert q.returncode == 0 and "centralized" in q.stdout, q.stderr


@pytest.mark.parametrize("args,needle", [
    (["--workers", "0"], "--workers must be >= 1"),
    (["--gradient-ms", "-1"], "--gradient-ms must be > 0"),
    (["--modes", "nope"], "--modes: 'nope' is not a bench mode"),
])
def test_simulate_bad_flags_are_one_line_exit_2(args, needle):
    p = subprocess.run([sys.executable, "-m", "apam_gossip", "simulate",
                        str(ROOT / "launch" / "profile_one_slow_worker.toml"), "--smoke", *args],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_the_scale_study_finds_where_the_master_saturates(tmp_path):
    """`simulate --scale`: every mode at each size, a table, a JSON and a PNG. With the
    study profile's costs (5 ms gradients, 0.11 ms master steps, LeNet5's 0.25 MB at
    10 Gb/s: 0.2 ms on the master's NIC each way) the master's NIC is the bottleneck at
    64 workers (at most 5,000 updates/s) and gossip has none."""
    out = tmp_path / "study.json"
    p = subprocess.run([sys.executable, "-m", "apam_gossip", "simulate",
                        str(ROOT / "launch" / "study" / "one_slow_in_8.toml"), "--smoke",
                        "--timing-only", "--scale", "8,64", "-o", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    rows = {(r["workers"], r["mode"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 10 and out.with_suffix(".png").stat().st_size > 10_000
    apam, gossip = rows[64, "centralized"], rows[64, "gossip-ring"]
    assert apam["master_nic_busy"] > 0.97 and rows[8, "centralized"]["master_nic_busy"] < 0.5
    assert apam["master_busy"] < apam["master_nic_busy"]  # its update loop waits on it
    nic_s = rows[8, "centralized"]["n_params_bytes"] * 8 / 10e9
    assert apam["samples_per_s"] <= 32 / nic_s * 1.001  # batch 32 x what the NIC carries
    assert gossip["samples_per_s"] > 1.3 * apam["samples_per_s"]
    assert "master cpu/nic" in p.stdout


@pytest.mark.slow
def test_the_scale_study_in_math_mode_has_time_to_target(tmp_path):
    out = tmp_path / "study.json"
    p = subprocess.run([sys.executable, "-m", "apam_gossip", "simulate",
                        str(ROOT / "launch" / "study" / "one_slow_in_8.toml"), "--smoke",
                        "--scale", "4", "-q", "-o", str(out)],
                       capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["rows"]
    assert all(r["final_metric"] > 0.5 for r in rows)  # digits, 4 epochs: all learn
    assert all(r["time_to_target_s"] for r in rows if r["mode"] != "allreduce-amsgrad")


def test_seeds_give_means_and_spreads(tmp_path):
    """`--seeds 3`: every mode with seeds s, s+1, s+2; rows are means with standard
    deviations, every seed's results are kept, and the seeds really differ."""
    out = tmp_path / "s.json"
    p = subprocess.run([sys.executable, "-m", "apam_gossip", "simulate",
                        str(ROOT / "launch" / "profile_validation4.toml"), "--smoke",
                        "--seeds", "3", "--modes", "centralized,decentralized",
                        "--gradient-ms", "1", "--master-ms", "0.1", "-q", "-o", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    assert "mean±sd over 3 seeds" in p.stdout
    d = json.loads(out.read_text())
    assert d["seeds"] == 3 and len(d["seed_runs"]) == 3
    finals = [run["centralized"]["final_metric"] for run in d["seed_runs"]]
    seeds = [run["centralized"]["config"]["seed"] for run in d["seed_runs"]]
    assert seeds == [seeds[0], seeds[0] + 1, seeds[0] + 2]
    row = d["rows"][0]
    assert row["seeds"] == 3 and row["final_metric"] == pytest.approx(sum(finals) / 3)
    assert row["samples_per_s_sd"] > 0  # the seeds' timings differ (gradient noise)
    bad = subprocess.run([sys.executable, "-m", "apam_gossip", "simulate",
                          str(ROOT / "launch" / "profile_validation4.toml"), "--smoke",
                          "--seeds", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--seeds must be >= 1" in bad.stderr


@pytest.mark.parametrize("mode", ["sequential", "centralized", "decentralized", "allreduce",
                                  "dpsgd"])
def test_evaluations_during_the_run_on_a_subset_the_final_on_all(digits, mode):
    """eval_samples: the records during the run score the first N test samples, the last
    the whole test set (real sequential run and every simulated mode)."""
    from apam_gossip.evaluate import Evaluator
    from apam_gossip.task import make_task

    cfg = make_cfg(mode=mode, workers=3, steps=90, evals=4, eval_samples=40,
                   threads_per_worker=1)
    r = run(cfg, dataset=digits) if mode == "sequential" else \
        simulate(cfg, dataset=digits, **COSTS)
    n_test = digits.test_size()
    assert [e.extra["eval_samples"] for e in r.evals] == [40] * (len(r.evals) - 1) + [n_test]
    full = Evaluator(make_task(cfg, digits), digits)
    assert r.evals[-1].test_metric == full(r.final_params)[1]


def test_overlap_hides_a_link_up_to_the_gradient(digits):
    """Gossip with a 20 ms round trip and 10 ms gradients: a step takes about the round
    trip with overlap, and round trip + gradient without; with a link much faster than the
    gradient both take one gradient. Both orders average once per step."""
    kw = {"mode": "decentralized", "workers": 4, "topology": "ring", "steps": 400}

    def per_step(latency_ms: float, overlap: bool) -> float:
        r = simulate(make_cfg(kw, overlap=overlap, network={"latency_ms": latency_ms}),
                     dataset=digits, timing_only=True, gradient_s=0.01, gradient_cv=0.0,
                     master_update_s=0.0, worker_update_s=0.0)
        assert r.evals[-1].extra["averages"] == 400
        return r.wall_time / (400 / 4)
    assert per_step(10.0, True) == pytest.approx(0.020, rel=0.05)
    assert per_step(10.0, False) == pytest.approx(0.030, rel=0.05)
    assert per_step(0.01, True) == pytest.approx(0.010, rel=0.05)
    assert per_step(0.01, False) == pytest.approx(0.010, rel=0.05)


def test_simulated_lookahead_hands_out_a_model_ahead_and_still_learns(digits):
    """centralized --lookahead: with 4 workers the run differs from lookahead 0 and
    still learns; with 1 worker it looks 0 updates ahead, the plain run bit for bit."""
    kw = {"mode": "centralized", "steps": 300, "evals": 1, "optim": {"lr": 2e-3}}
    plain = simulate(make_cfg(kw, workers=4), dataset=digits, **COSTS)
    ahead = simulate(make_cfg(kw, workers=4, optim={"lookahead": 1.0}), dataset=digits,
                     **COSTS)
    assert not torch.equal(plain.final_params, ahead.final_params)
    assert ahead.final_accuracy > 0.8
    one = [simulate(make_cfg(kw, workers=1, optim={"lookahead": la}), dataset=digits,
                    **COSTS).final_params for la in (0.0, 1.0)]
    assert torch.equal(*one)


def test_gossip_lr_rules_are_the_lr_times_n_or_sqrt_n(digits):
    """gossip_lr = workers multiplies each local step's lr by n, sqrt by sqrt(n): the same
    simulation as that lr given by hand, bit for bit; the default leaves it as given."""
    kw = {"mode": "decentralized", "workers": 4, "topology": "ring", "steps": 80, "evals": 1}

    def final(lr: float, rule: str | None = None) -> torch.Tensor:
        optim = {"lr": lr} if rule is None else {"lr": lr, "gossip_lr": rule}
        return simulate(make_cfg(kw, optim=optim), dataset=digits, **COSTS).final_params

    assert torch.equal(final(1e-3, "workers"), final(4e-3))
    assert torch.equal(final(1e-3, "sqrt"), final(2e-3))
    assert torch.equal(final(1e-3), final(1e-3, "none"))
    assert not torch.equal(final(1e-3), final(2e-3))
