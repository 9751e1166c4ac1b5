"""Where the shared state lives (issue 21), on CPU machines: the per-worker rows and their
sharing with spawned processes, the measured overlap choice, the master's device, and a
default gossip run that reports each worker's choice. The same code paths on a GPU are in
tests/test_gpu.py (skipped without CUDA)."""

from __future__ import annotations

import pickle

import pytest
import torch

from apam_gossip.algorithms.adpsgd import OverlapChoice
from apam_gossip.placement import master_device
from apam_gossip.procs import CTX
from apam_gossip.runner import run
from apam_gossip.transport.rows import Rows, fence

from helpers import make_cfg

pytestmark = pytest.mark.timeout(240)


def _child_writes(rows: Rows, i: int, value: float) -> None:
    rows[i].fill_(value)
    fence(rows[i])


def test_host_rows_are_views_of_one_shared_block_that_a_spawned_process_writes():
    rows = Rows(3, (2, 2), torch.float64)
    assert rows.shape == (3, 2, 2) and len(rows) == 3 and not rows.on_gpu
    rows.copy_(torch.arange(12, dtype=torch.float64).reshape(3, 2, 2))
    assert float(rows[1, 0, 1]) == 5.0
    p = CTX.Process(target=_child_writes, args=(rows, 2, 7.0))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    c = rows.clone()
    assert c[2].eq(7.0).all() and c[0].flatten().tolist() == [0, 1, 2, 3]
    c[0].fill_(-1)  # a clone is a copy
    assert float(rows[0, 0, 0]) == 0.0
    back = pickle.loads(pickle.dumps(rows))  # rows are views again after a pickle
    back[1].fill_(3.0)
    assert back.clone()[1].eq(3.0).all() and back[1].data_ptr() == back._host[1].data_ptr()


def test_a_gossip_end_carries_only_the_rows_its_worker_touches(monkeypatch):
    """On GPUs a row reaching a process opens a CUDA context on the row's GPU there: an
    end ships its own rows and its neighbours', not all of them."""
    from apam_gossip.transport.shm import ShmGossip

    monkeypatch.setenv("APAM_GOSSIP_ROWS", "separate")
    g = ShmGossip(4, 6, tracked=True)
    g.share_optimizer_state({"m": torch.zeros(6), "step": torch.zeros(())})
    end = g.end(1, 5.0, neighbors=[2])
    shipped = pickle.loads(pickle.dumps(end.x))  # as a spawned worker gets them
    assert [r is not None for r in shipped._rows] == [False, True, True, False]
    assert [r is not None for r in end.x._rows] == [False, True, True, False]
    assert [r is not None for r in end.u._rows] == [False, True, True, False]
    assert [r is not None for r in end.shared_opt_state["m"]._rows] == [False, True, False,
                                                                           False]
    end.average_with(2)  # what it touches works; what it never touches is not there
    assert set(end.optimizer_state()) == {"m", "step"}
    with pytest.raises(AssertionError, match="row 3 is not in this process"):
        end.x[3]
    whole = g.end(1, 5.0)  # no neighbours given: every row
    assert all(r is not None for r in whole.x._rows)


def test_host_rows_can_be_forced_for_gpu_workers_without_cuda_ipc(monkeypatch):
    monkeypatch.setenv("APAM_GOSSIP_ROWS", "host")
    rows = Rows(2, 3, devices=["meta", "meta"])  # any device: the rows stay on the host
    assert not rows.separate and not rows.on_gpu and rows[1].device.type == "cpu"


def test_rows_refuse_a_device_list_of_the_wrong_length():
    with pytest.raises(ValueError, match="2 devices for 3 rows"):
        Rows(3, 4, devices=["cpu", "cpu"])


def test_a_forced_overlap_choice_never_changes():
    for forced in (True, False):
        c = OverlapChoice(forced)
        for k in range(40):
            assert c.now() is forced
            c.record(forced, 1.0 + k)
        assert c.decided is forced and c.measured() is None


@pytest.mark.parametrize("beside_s,faster", [(0.5, True), (2.0, False)])
def test_a_measured_overlap_choice_keeps_the_faster_way(beside_s, faster):
    c = OverlapChoice(None)
    ways = []
    while c.decided is None:
        way = c.now()
        ways.append(way)
        # warm-up steps are slow (compiles, caches) and must not count
        c.record(way, 100.0 if len(ways) <= c.WARMUP else (beside_s if way else 1.0))
    assert ways == [False] * c.WARMUP + [False, True] * c.PROBE  # alternating
    assert c.decided is faster and c.now() is faster
    assert c.measured() == {"sequential_s": 1.0, "overlapped_s": beside_s}


def test_a_run_that_ends_before_the_choice_says_what_it_ran():
    c = OverlapChoice(None)
    for _ in range(c.WARMUP + 1):  # never overlapped yet
        c.record(c.now(), 1.0)
    assert c.decided is None and c.kept() is False and c.measured() is None
    c.record(c.now(), 0.5)  # the first overlapped step: mid-probe, both ways ran
    assert c.kept() is None and c.measured() == {"sequential_s": 1.0, "overlapped_s": 0.5}


def test_the_master_is_on_the_cpu_unless_a_gpu_is_asked_for_and_present():
    assert master_device(make_cfg(device="cpu")).type == "cpu"
    assert master_device(make_cfg(device="auto", master_device="cpu")).type == "cpu"
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert master_device(make_cfg(device="auto")).type == want
    assert master_device(make_cfg(device="cpu", master_device="cuda")).type == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_a_master_on_a_gpu_that_is_not_there_is_refused_not_moved_to_the_cpu(tmp_path):
    from apam_gossip.config import ConfigError
    from apam_gossip.runner import check_runnable

    with pytest.raises(ConfigError, match="master_device cuda was requested"):
        check_runnable(make_cfg(mode="centralized", master_device="cuda"))
    check_runnable(make_cfg(mode="decentralized", master_device="cuda"))  # not its setting
    r = run(make_cfg(mode="centralized", workers=2, steps=20, master_device="auto"))
    assert r.provenance["master_device"] == "cpu"


def test_a_default_gossip_run_reports_each_workers_measured_overlap(digits):
    """Each worker times its first steps both ways and says which it kept; --no-overlap
    and --overlap say so without measuring. The math is the same: the audit holds."""
    base = {"mode": "decentralized", "workers": 2, "topology": "complete", "steps": 120,
            "evals": 1, "audit": True, "data": {"batch_size": 16}}
    r = run(make_cfg(base), dataset=digits)
    assert [type(w.overlap) for w in r.workers] == [bool, bool]
    assert r.evals[-1].extra["audit_error"] <= 1e-5
    for forced in (False, True):
        r = run(make_cfg(base, overlap=forced, steps=40), dataset=digits)
        assert [w.overlap for w in r.workers] == [forced, forced]


@pytest.mark.parametrize("mode", ["decentralized", "centralized", "allreduce", "dpsgd"])
def test_every_mode_runs_on_separate_rows_the_path_gpu_rows_take(digits, monkeypatch, mode):
    """APAM_GOSSIP_ROWS=separate gives every worker its own row tensor, as GPU workers
    have: the same run, the same guarantees (the audit; all-reduce replicas equal to the
    in-process rule within float rounding of a different summation order)."""
    cfg = make_cfg({"mode": mode, "workers": 3, "topology": "complete", "steps": 90,
                    "evals": 1, "data": {"batch_size": 16},
                    "audit": mode == "decentralized",
                    "adaptive_state": "tracked" if mode == "decentralized" else "local"})
    block = run(cfg, dataset=digits)
    monkeypatch.setenv("APAM_GOSSIP_ROWS", "separate")
    sep = run(cfg, dataset=digits)
    assert Rows(2, 3).separate  # the knob is on in this process too
    assert sep.updates == block.updates and sep.final_accuracy > 0.5
    if mode == "decentralized":
        assert sep.evals[-1].extra["audit_error"] <= 1e-5
        assert sep.evals[-1].extra["audit_u_error"] <= 1e-5
    if mode in ("allreduce", "dpsgd"):  # lockstep: the same trajectory up to rounding
        diff = (sep.final_params - block.final_params).abs().max().item()
        assert diff <= 1e-4, diff
