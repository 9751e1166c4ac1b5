"""A sharded APAM master (issue 24, ``master_shards``): the slices and the worker's end
in-process, then real processes: equal to one master where the math says so, a budget
every shard applies exactly, a stop that is a consistent cut, deaths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_faults import KillAt

from apam_gossip.checkpoint import load_checkpoint, save_checkpoint
from apam_gossip.core.apam import join_states, shards_of
from apam_gossip.messages import Bye, Grad, Hello, Params, Stop
from apam_gossip.optim import Optimizer
from apam_gossip.procs import ChildFailed
from apam_gossip.runner import RunInterrupted, run
from apam_gossip.transport import PeerGone
from apam_gossip.transport.sharded import ShardedWorkerEnd

from helpers import make_cfg, sigterm_at

pytestmark = pytest.mark.timeout(240)


# -- the slices, in-process ---------------------------------------------------------
@pytest.mark.parametrize("numel,n_params,count", [(10, 10, 3), (10, 7, 3), (10, 2, 4),
                                                  (5, 5, 5), (1000, 990, 7)])
def test_shards_cover_the_model_once_and_split_params_from_buffers(numel, n_params, count):
    shards = shards_of(numel, n_params, count)
    assert [s.index for s in shards] == list(range(count)) and shards[0].leader
    assert shards[0].start == 0 and shards[-1].stop == numel
    assert all(a.stop == b.start for a, b in zip(shards, shards[1:], strict=False))
    assert max(s.numel for s in shards) - min(s.numel for s in shards) <= 1
    assert sum(s.n_params for s in shards) == n_params
    for s in shards:  # a shard's trained entries come first, then its buffers
        assert s.n_params == len(range(s.start, min(s.stop, n_params)))


@pytest.mark.parametrize("count", [0, 11])
def test_more_shards_than_entries_or_none_is_a_value_error(count):
    with pytest.raises(ValueError, match=f"master_shards .* got {count}"):
        shards_of(10, 8, count)


def test_sharded_amsgrad_steps_are_the_whole_models_bit_for_bit():
    """Every optimizer here is elementwise: K shards stepping their slices give the same
    bits as one master stepping the whole (what K > 1 with one worker relies on)."""
    torch.manual_seed(0)
    n = 1001
    x, opt = torch.randn(n), Optimizer("amsgrad", lr=1e-2, weight_decay=1e-4)
    shards = shards_of(n, n, 4)
    whole, state = x.clone(), opt.init(x)
    parts = [s.of(x).clone() for s in shards]
    states = [opt.init(p) for p in parts]
    for _ in range(20):
        g = torch.randn(n)
        opt.update(whole, g, state)
        for s, p, st in zip(shards, parts, states, strict=True):
            opt.update(p, s.of(g), st)
    assert torch.equal(torch.cat(parts), whole)
    joined = join_states(states)
    assert set(joined) == set(state)
    assert all(torch.equal(joined[k], state[k]) for k in state)
    # and a whole state sliced back is each shard's
    for s, st in zip(shards, states, strict=True):
        assert all(torch.equal(s.state_of(state)[k], st[k]) for k in st)


class _End:
    """A fake star end: records what it was sent, replies from a script."""

    def __init__(self, worker: int, replies: list) -> None:
        self.worker, self.replies, self.sent = worker, list(replies), []

    def send(self, grad, meta) -> None:
        if meta == "gone":
            raise PeerGone("gone")
        self.sent.append((None if grad is None else grad.clone(), meta))

    def recv(self, out, timeout):
        msg, fill = self.replies.pop(0)
        if msg == "gone":
            raise PeerGone("gone")
        if out is not None:
            out.fill_(fill)
        return msg


def test_the_workers_end_routes_slices_and_each_shards_version():
    shards = shards_of(6, 4, 3)
    ends = [_End(2, [(Params(7), 1.0)]), _End(2, [(Params(5), 2.0)]),
            _End(2, [(Params(9), 3.0)])]
    end = ShardedWorkerEnd(ends, shards)
    end.send(None, Hello(2))
    assert all(e.sent == [(None, Hello(2))] for e in ends)
    x = torch.zeros(6)
    msg = end.recv(x, 1.0)
    assert msg == Params(7)  # the leader's version
    assert x.tolist() == [1, 1, 2, 2, 3, 3]  # each slice from its shard
    end.send(torch.arange(6.0), Grad(7, 32, 0.5, 0.01))
    got = [e.sent[-1] for e in ends]
    assert [m.version for _, m in got] == [7, 5, 9]  # each shard's own
    assert [g.tolist() for g, _ in got] == [[0, 1], [2, 3], [4, 5]]


def test_the_workers_end_stops_at_the_leaders_stop_and_skips_a_gone_follower():
    shards = shards_of(4, 4, 2)
    leader, follower = _End(0, [(Stop(), 0.0)]), _End(0, [("gone", 0.0)])
    assert isinstance(ShardedWorkerEnd([leader, follower], shards).recv(torch.zeros(4), 1),
                      Stop)
    # at the leader's stop the follower's reply is taken too, then it is told goodbye
    leader, follower = _End(0, [(Stop(), 0.0)]), _End(0, [(Params(3), 1.0)])
    assert isinstance(ShardedWorkerEnd([leader, follower], shards).recv(torch.zeros(4), 1),
                      Stop)
    assert follower.replies == [] and follower.sent == [(None, Bye())]
    leader, follower = _End(0, [(Params(1), 0.0), (Params(2), 0.0)]), \
        _End(0, [("gone", 0.0)])
    end = ShardedWorkerEnd([leader, follower], shards)
    assert end.recv(torch.zeros(4), 1) == Params(1)  # a follower gone: skipped
    assert end.recv(torch.zeros(4), 1) == Params(2)
    dead = _End(0, [("gone", 0.0)])
    with pytest.raises(PeerGone):  # the leader gone is the master gone
        ShardedWorkerEnd([dead, _End(0, [(Params(1), 0.0)])], shards).recv(torch.zeros(4), 1)


# -- real processes -------------------------------------------------------------------
@pytest.mark.parametrize("model", ["mlp", "user_models:DigitsBNNoDropout"])
def test_one_worker_with_shards_is_the_sequential_run_bit_for_bit(digits, model):
    """K shards apply the one worker's gradients in its order: the sequential run's bits,
    buffers (BatchNorm statistics, which one shard may hold only part of) included."""
    base = {"workers": 1, "epochs": 1, "evals": 2, "model": model, "seed": 5}
    seq = run(make_cfg(base, mode="sequential"), dataset=digits, quiet=True)
    numel = seq.final_params.numel()
    for k in (2, 3):
        r = run(make_cfg(base, mode="centralized", master_shards=k), dataset=digits,
                quiet=True)
        assert torch.equal(r.final_params, seq.final_params), (model, k)
        assert r.updates == seq.updates and r.final_params.numel() == numel


def test_every_shard_applies_the_budget_and_reports_its_staleness(digits):
    cfg = make_cfg({"mode": "centralized", "workers": 4, "epochs": 3, "evals": 3,
                    "master_shards": 3, "slowdown": [1, 2, 1, 3]})
    r = run(cfg, dataset=digits, quiet=True)
    total = -(-3 * len(digits.y_train) // 16)  # (BASE: batch 16)
    assert r.updates == total and sum(r.staleness.values()) == total
    assert r.samples == sum(w.samples for w in r.workers)
    extra = r.evals[-1].extra
    assert {f"staleness_mean_shard{k}" for k in range(3)} <= set(extra)
    assert all(0 < extra[f"staleness_mean_shard{k}"] < 10 for k in range(3))
    assert r.final_accuracy > 0.7  # (it trains; 3 epochs of 4 stale workers: 0.84-0.93)
    assert [e.updates for e in r.evals] == sorted(e.updates for e in r.evals)


@pytest.mark.slow
def test_a_stop_is_a_consistent_cut_and_the_checkpoint_is_the_whole_model(tmp_path, digits):
    """One worker, 2 shards, SIGTERM mid-run: the joined checkpoint is exactly the
    sequential run's model and AMSGrad state after as many updates (a consistent cut:
    both shards at the same update), and it resumes, with 3 shards, to the budget."""
    ckpt = tmp_path / "run.ckpt"
    base = {"workers": 1, "epochs": 30, "evals": 3, "seed": 2, "slowdown": [3]}
    cfg = make_cfg(base, mode="centralized", master_shards=2, checkpoint=str(ckpt))
    with pytest.raises(RunInterrupted, match="--resume"):
        run(cfg, dataset=digits, callback=sigterm_at(0.3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]  # parts joined
    ck = load_checkpoint(ckpt)
    done = ck["version"]
    assert ck["shard_versions"] == [done, done]
    assert int(ck["opt_state"]["step"]) == done and ck["samples"] == 16 * done
    seq = run(make_cfg(base, mode="sequential", steps=done, slowdown=[]), dataset=digits,
              quiet=True)
    assert torch.equal(ck["x"], seq.final_params)
    # a checkpoint at the end of its budget resumes and ends at once (every worker
    # waits at the leader from the start: the end must stop them, not wait for them)
    spent = tmp_path / "spent.ckpt"
    save_checkpoint(spent, {**{k: v for k, v in ck.items() if k != "format"},
                            "config": {**ck["config"], "steps": done, "checkpoint": None}})
    r = run(None, dataset=digits, resume=str(spent), quiet=True)
    assert r.updates == done and torch.equal(r.final_params, ck["x"])
    spent.unlink()
    # resume with another number of shards: the checkpoint is the whole model's
    ck["config"]["master_shards"] = 3
    save_checkpoint(ckpt, {k: v for k, v in ck.items() if k != "format"})
    r = run(None, dataset=digits, resume=str(ckpt), quiet=True)
    total = -(-30 * len(digits.y_train) // 16)
    assert r.updates == total and r.evals[0].updates >= done
    assert r.final_accuracy >= 0.9


def test_periodic_checkpoints_are_consistent_cuts(tmp_path, digits):
    """Every checkpoint_every_s the leader pauses the asking, every shard saves at one
    version, and the parts join: one worker, 3 shards, the last periodic checkpoint is
    exactly the sequential run's state at its update; the pauses lose no gradient."""
    ckpt = tmp_path / "run.ckpt"
    base = {"workers": 1, "epochs": 6, "evals": 2, "seed": 4, "slowdown": [2]}
    r = run(make_cfg(base, mode="centralized", master_shards=3, checkpoint=str(ckpt),
                     checkpoint_every_s=0.2), dataset=digits, quiet=True)
    total = -(-6 * len(digits.y_train) // 16)
    assert r.updates == total
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]
    ck = load_checkpoint(ckpt)
    done = ck["version"]
    assert 0 < done < total and ck["shard_versions"] == [done] * 3
    seq = run(make_cfg(base, mode="sequential", steps=done, slowdown=[]), dataset=digits,
              quiet=True)
    assert torch.equal(ck["x"], seq.final_params)
    assert int(ck["opt_state"]["step"]) == done


def test_periodic_cuts_with_several_workers_lose_nothing(tmp_path, digits):
    ckpt = tmp_path / "run.ckpt"
    cfg = make_cfg({"mode": "centralized", "workers": 4, "epochs": 4, "evals": 2,
                    "master_shards": 2, "slowdown": [1, 2, 3, 1], "checkpoint": str(ckpt),
                    "checkpoint_every_s": 0.1})
    r = run(cfg, dataset=digits, quiet=True)
    assert r.updates == -(-4 * len(digits.y_train) // 16) == sum(r.staleness.values())
    ck = load_checkpoint(ckpt)
    assert ck["shard_versions"] == [ck["version"]] * 2
    assert int(ck["opt_state"]["step"]) == ck["version"] > 0
    assert ck["x"].numel() == r.final_params.numel()


@pytest.mark.slow
def test_a_killed_worker_is_survived_and_every_shard_finishes_the_budget(digits):
    cfg = make_cfg({"mode": "centralized", "workers": 4, "epochs": 20, "evals": 4,
                    "master_shards": 2, "slowdown": [3] * 4, "optim": {"lr": 2e-3}})
    kill = KillAt("worker 2", 0.3)
    r = run(cfg, dataset=digits, callback=kill)
    assert kill.done and r.failed_workers == [2]
    assert r.updates == -(-20 * len(digits.y_train) // 16)
    assert r.workers[2].updates < r.updates / 4
    assert r.final_accuracy >= 0.9


@pytest.mark.slow
def test_a_killed_master_shard_ends_the_run_with_its_name(digits):
    cfg = make_cfg({"mode": "centralized", "workers": 3, "epochs": 20, "evals": 3,
                    "master_shards": 2, "slowdown": [3] * 3})
    kill = KillAt("master 1", 0.2)
    with pytest.raises(ChildFailed, match="master 1: process died"):
        run(cfg, dataset=digits, callback=kill)
    assert kill.done


def test_bad_shard_counts_are_one_line_exit_2(tmp_path):
    for flag, what in (("0", "--master-shards"), ("5000", "--master-shards")):
        p = subprocess.run([sys.executable, "-m", "apam_gossip", "train", "--workers", "1",
                            "--master-shards", flag, "-o", str(tmp_path / "r.json")],
                           capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).parent.parent)
        assert p.returncode == 2, p.stderr
        assert what in p.stderr and "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "r.json").exists()


def test_more_shards_than_the_model_has_entries_is_a_config_error():
    from apam_gossip.config import ConfigError
    from apam_gossip.runtime.shards import MasterShards

    with pytest.raises(ConfigError, match="master_shards must be between 1 and the model's 3"):
        MasterShards(make_cfg(master_shards=5), 3, 3, lambda msg: None)


@pytest.mark.skipif(not (Path(sys.executable).parent / "mpirun").exists(),
                    reason="mpirun not in the venv")
def test_two_shards_and_four_workers_under_mpirun(tmp_path):
    """Ranks 0-1 the master's shards, ranks 2-5 the workers: every worker trains, the
    budget is applied by both shards, and rank 0 reports alone."""
    import json

    from test_mpi import cli, mpirun

    out = tmp_path / "s.json"
    p = mpirun(6, *cli("train", "--mode", "centralized", "--master-shards", "2", "--epochs",
                       "10", "--lr", "2e-3", "--evals", "3", "-o", str(out)))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ranks 0-1 are the master's shards, 4 workers" in p.stdout
    d = json.loads(out.read_text())
    assert d["transport"] == "mpi" and d["config"]["master_shards"] == 2
    assert d["config"]["workers"] == 4 and all(w["updates"] > 0 for w in d["workers"])
    assert d["updates"] == -(-10 * 1437 // 32) == sum(d["staleness"].values())
    extra = d["evals"][-1]["extra"]
    assert extra["staleness_mean_shard0"] > 0 and extra["staleness_mean_shard1"] > 0
    assert d["final_accuracy"] >= 0.95
    assert p.stdout.count("result written to") == 1


# -- the simulator ----------------------------------------------------------------------
def test_a_simulated_sharded_master_with_one_worker_is_the_sequential_run(digits):
    from apam_gossip.sim import simulate

    kw = {"workers": 1, "steps": 120, "evals": 3, "threads_per_worker": 1}
    seq = run(make_cfg(kw, mode="sequential"), dataset=digits, quiet=True)
    for k in (2, 3):
        sim = simulate(make_cfg(kw, mode="centralized", master_shards=k), dataset=digits,
                       gradient_s=1e-3, master_update_s=1e-4, worker_update_s=1e-4)
        assert torch.equal(sim.final_params, seq.final_params), k
        assert [e.test_metric for e in sim.evals] == [e.test_metric for e in seq.evals]
        assert sim.updates == 120


def test_simulated_shards_lift_a_master_bound_ceiling():
    """A master whose step and NIC bound the run (25M parameters, 10 Gb/s, 64 workers):
    K shards each carry 1/K of the bytes and the step, so throughput rises with K until
    the workers bound it; every shard applies the same budget."""
    from apam_gossip.sim import simulate

    cfg = make_cfg(mode="centralized", workers=64, steps=3000, evals=2,
                   network={"bandwidth_gbps": 10.0, "latency_ms": 0.05})
    rates = {}
    for k in (1, 4, 16):
        r = simulate(cfg.replace(master_shards=k), timing_only=True, model_params=25_000_000,
                     gradient_s=0.1, master_update_s=0.08, worker_update_s=0.0)
        assert r.updates == 3000 and sum(r.staleness.values()) == 3000
        rates[k] = r.samples_per_s
        if k > 1:
            extra = r.evals[-1].extra
            assert len([key for key in extra if key.startswith("staleness_mean_shard")]) == k
    # 1 master: NIC (2 x 100 MB per update at 10 Gb/s = 0.16 s) -> ~6 updates/s
    assert rates[4] > 3 * rates[1] and rates[16] > 1.5 * rates[4], rates


def test_the_leader_asks_each_worker_once_when_one_dies_as_it_resumes():
    """After a checkpoint's cut the leader asks its waiting workers again; one that died
    meanwhile gives its gradient back to the pool, which must not ask a worker twice."""
    import types

    from apam_gossip.algorithms.apam import ApamMaster
    from apam_gossip.algorithms.shards import Leader

    sent = []

    class End:
        n_workers = 4

        def send(self, i, params, meta):
            if i == 1:
                raise PeerGone("worker 1 closed its connection")
            sent.append(i)

    m = types.SimpleNamespace(end=End(), n=4, gone=set(), _staged=None, total=100,
                              checkpoint=None, follower=False,
                              core=types.SimpleNamespace(version=10,
                                                         model_for_workers=lambda: None),
                              ctrl=types.SimpleNamespace(poll=lambda: False))
    for name in ("send", "give", "lost", "live"):
        setattr(m, name, types.MethodType(getattr(ApamMaster, name), m))
    lead = Leader(m, link=types.SimpleNamespace(poll=lambda: []))
    m.role = lead
    lead.asked = 10
    lead.waiting, lead.pausing = {0, 1, 2, 3}, True  # a cut (no checkpoint) just ended
    assert lead.ended_round() is False
    assert sorted(sent) == [0, 2, 3] and lead.holding == {0, 2, 3} and lead.asked == 13


def test_a_follower_saves_at_the_leaders_counts_without_waiting_for_a_dead_worker():
    """A follower saves its part once it has every gradient the leader had at the cut
    that can still come: a live worker's missing gradient is waited for (it is in
    flight); a dead worker's (killed between its slices) is not, so the cut takes no
    grace period."""
    import types

    from apam_gossip.algorithms.shards import SAVE_GRACE_S, Follower
    from apam_gossip.messages import PartSaved, SaveAt

    sent, inbox = [], []
    link = types.SimpleNamespace(send=sent.append, poll=lambda: [inbox.pop()] if inbox else [],
                                 payload=lambda path: path)
    progress = types.SimpleNamespace(updates_of=[5, 3, 4])
    m = types.SimpleNamespace(gone=set(), n=3, saved=0, ctrl=types.SimpleNamespace(
                              poll=lambda: False),
                              core=types.SimpleNamespace(version=12, progress=progress),
                              live=lambda: {0, 1, 2} - m.gone, part_path=lambda: "part",
                              save=lambda: setattr(m, "saved", m.saved + 1))
    f = Follower(m, link)
    inbox.append((0, SaveAt(13, (5, 4, 4))))  # worker 1's 4th gradient: the leader's only
    f._listen()
    assert m.saved == 0 and not sent  # worker 1 lives: its gradient is on its way
    assert f.save_by - __import__("time").monotonic() > SAVE_GRACE_S - 5
    progress.updates_of[1] = 4  # it came
    f._listen()
    assert m.saved == 1 and sent == [PartSaved("part", 12, 13)]
    inbox.append((0, SaveAt(20, (9, 4, 7))))
    progress.updates_of[:] = [9, 4, 6]
    m.gone.add(2)  # worker 2 died between its slices: its 7th never comes here
    f._listen()
    assert m.saved == 2 and f.save_at is None
