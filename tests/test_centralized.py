"""Multi-process tier: centralized APAM with real worker processes (shared-memory transport)."""

from __future__ import annotations

import pytest
import torch

from apam_gossip.config import RunConfig
from apam_gossip.procs import ChildFailed
from apam_gossip.runner import RunTimeout, run

from helpers import make_cfg

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("variant", ["practical", "paper"])
def test_one_worker_equals_sequential_amsgrad(digits, variant):
    """With one worker APAM is sequential AMSGrad on the same batches: same trajectory."""
    optim = {"bias_correction": variant == "practical"}
    cen = run(make_cfg(mode="centralized", workers=1, steps=200, optim=optim), dataset=digits)
    seq = run(make_cfg(mode="sequential", workers=1, steps=200, optim=optim), dataset=digits)
    assert cen.updates == seq.updates == 200
    assert cen.staleness == {0: 200}
    diff = (cen.final_params - seq.final_params).abs().max().item()
    assert diff <= 1e-6, f"APAM (1 worker) drifted from sequential AMSGrad by {diff}"
    # and the model really trained (a trivial equality of untouched params proves nothing)
    from apam_gossip.task import make_task

    x0, _ = make_task(cen_cfg(cen), digits, check=False).initial_state()
    assert (cen.final_params - x0).abs().max() > 1e-2


def cen_cfg(result) -> RunConfig:
    return RunConfig.from_dict(result.config)


@pytest.mark.slow
def test_slow_worker_does_not_block_fast_ones(digits):
    """Worker 3 is 10x slower than the others: the master keeps serving the fast ones.

    Every worker gets a base slowdown of 2 (worker 3: 20), so 4 workers do not
    oversubscribe 2 cores: otherwise the OS scheduler's unfairness among CPU-bound
    processes (+-20% here), not the master, would decide who gets served.
    """
    cfg = make_cfg(mode="centralized", workers=4, steps=1000, slowdown=[2, 2, 2, 20],
               data={"batch_size": 256})
    r = run(cfg, dataset=digits)
    updates = [w.updates for w in r.workers]
    assert sum(updates) == 1000
    # 10x slower; a synchronous master would give all four the same count. Each fast worker
    # gets >= 5x (CI's shared cores have given 8x-9x where 10x is ideal)
    slow = max(updates[3], 1)
    for i in range(3):
        assert updates[i] >= 5 * slow, f"fast worker {i}: {updates} (slow worker 3)"
    # a recorded, non-trivial staleness histogram: several distinct values, sums to updates
    assert sum(r.staleness.values()) == 1000
    assert len(r.staleness) >= 3 and max(r.staleness) >= 3
    assert r.workers[3].sleep_s > 15 * r.workers[3].compute_s  # slowdown really injected


def test_four_workers_reach_95_percent_on_digits(digits):
    cfg = make_cfg(mode="centralized", workers=4, epochs=15, evals=3,
               data={"batch_size": 32}, optim={"lr": 2e-3})
    r = run(cfg, dataset=digits)
    assert r.final_accuracy >= 0.95, r.evals
    assert [e.updates for e in r.evals][0] == 0 and r.evals[-1].updates == r.updates
    assert all(e.wall_time >= 0 for e in r.evals)
    assert r.samples == r.updates * 32


def test_result_json_round_trip(digits, tmp_path):
    from apam_gossip.result import RunResult

    r = run(make_cfg(mode="centralized", workers=2, steps=50), dataset=digits)
    p = tmp_path / "r.json"
    r.save(p)
    back = RunResult.load(p)
    assert back.staleness == r.staleness
    assert back.evals == r.evals
    assert RunConfig.from_dict(back.config) == RunConfig.from_dict(r.config)


def test_worker_error_is_reported_and_everything_reaped(digits):
    """A worker that raises makes run() raise ChildFailed naming it, with its message; nothing
    leaks (the autouse no_leaks fixture checks processes and /dev/shm). The loss raises
    from its 11th call, so the check on two samples before the start passes."""
    cfg = make_cfg(mode="centralized", workers=2, steps=100, loss="user_models:raise_after_10")
    with pytest.raises(ChildFailed, match=r"worker \d: RuntimeError: boom at call 11"):
        run(cfg, dataset=digits)


def test_timeout_aborts_and_reaps(digits):
    cfg = make_cfg(mode="centralized", workers=2, steps=10_000, slowdown=[50, 50], timeout_s=4.0)
    with pytest.raises(RunTimeout, match="timeout_s=4"):
        run(cfg, dataset=digits)


def test_cuda_request_without_cuda_is_a_config_error(digits):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from apam_gossip.config import ConfigError

    with pytest.raises(ConfigError, match="device cuda"):
        run(make_cfg(mode="centralized", workers=1, steps=5, device="cuda"), dataset=digits)


@pytest.mark.parametrize("rule,factor", [("none", 1.0), ("sqrt", 0.5), ("inverse", 0.25)])
def test_the_master_scales_a_stale_gradients_step(rule, factor):
    """ApamCore.apply: a gradient computed 3 updates ago moves the model by lr x
    factor(3) (SGD: exactly), the user's lr (loop API) too; a fresh one by lr."""
    from apam_gossip.config import OptimConfig
    from apam_gossip.core.apam import ApamCore

    optim = OptimConfig(name="sgd", lr=0.1, staleness_lr=rule)
    master = ApamCore(torch.zeros(3), optim, 2, n_params=3, total=100)
    master.progress.version = 3
    assert master.apply(0, torch.ones(3), version=0, samples=1) == 3
    assert torch.allclose(master.x, torch.full((3,), -0.1 * factor))
    master.apply(1, torch.ones(3), version=4, samples=1)
    assert torch.allclose(master.x, torch.full((3,), -0.1 * factor - 0.1))  # fresh
    master.apply(0, torch.ones(3), version=2, samples=1, lr=0.2)  # the loop API's own lr
    assert torch.allclose(master.x, torch.full((3,), -0.1 * factor - 0.1 - 0.2 * factor))
    assert dict(master.progress.staleness) == {3: 2, 0: 1}


@pytest.mark.parametrize("rule,workers,beta1", [("workers", 8, 0.2), ("workers", 1, 0.9),
                                                ("none", 8, 0.9)])
def test_the_master_steps_with_a_momentum_shortened_by_its_workers(rule, workers, beta1):
    """The master's optimizer: beta1 0.9 becomes 1 - 0.1 x 8 = 0.2 with 8 workers (the
    default rule), stays 0.9 with one worker (= the sequential run) or rule none: the
    first step with m = 0 moves by (1 - beta1) g / sqrt(v) scaled, checked through m."""
    from apam_gossip.config import OptimConfig
    from apam_gossip.core.apam import ApamCore

    optim = OptimConfig(lr=0.1, staleness_momentum=rule)
    master = ApamCore(torch.zeros(3), optim, workers, n_params=3, total=100)
    assert master.opt.hp.beta1 == pytest.approx(beta1)
    master.apply(0, torch.ones(3), version=0, samples=1)
    assert torch.allclose(master.state["m"], torch.full((3,), 1 - beta1))


@pytest.mark.parametrize("mode", ["centralized", "decentralized", "allreduce"])
def test_real_runs_evaluate_a_subset_during_and_everything_at_the_end(digits, mode):
    """eval_samples on real processes (shared memory): the records during the run say 40,
    the final one the whole test set, and its metric is the final model's on all of it."""
    from apam_gossip.evaluate import Evaluator
    from apam_gossip.task import make_task

    cfg = make_cfg(mode=mode, workers=2, steps=60, evals=3, eval_samples=40)
    r = run(cfg, dataset=digits)
    marks = [e.extra["eval_samples"] for e in r.evals]
    assert marks[:-1] == [40] * (len(marks) - 1) and marks[-1] == digits.test_size()
    full = Evaluator(make_task(cfg, digits), digits)
    assert r.evals[-1].test_metric == full(r.final_params)[1]


def test_with_lookahead_the_master_hands_out_the_model_ahead_of_its_course(digits):
    """--lookahead 1 with 4 workers: after each update the model a worker gets is the
    master's moved 3 updates along its step (the buffers as they are), x itself is
    untouched; and a real run with it learns."""
    from apam_gossip.config import OptimConfig
    from apam_gossip.core.apam import ApamCore
    from apam_gossip.optim import lookahead_point

    optim = OptimConfig(lr=0.1, lookahead=1.0)  # the momentum rule is off with it
    master = ApamCore(torch.zeros(3), optim, 4, n_params=3, total=100)
    assert master.opt.hp.beta1 == 0.9
    assert torch.equal(master.model_for_workers(), master.x)  # nothing to follow yet
    master.apply(0, torch.tensor([1.0, -1.0, 0.0]), version=0, samples=1)
    x = master.x.clone()
    got = master.model_for_workers()
    want = lookahead_point(torch.empty(3), x, master.state, master.opt.hp, 0.1, 3)
    assert torch.equal(got, want) and torch.equal(master.x, x)
    assert got[0] < x[0] and got[1] > x[1] and got[2] == x[2]  # further along the step

    cfg = make_cfg(mode="centralized", workers=4, epochs=15, evals=2,
                   optim={"lr": 2e-3, "lookahead": 1.0})
    r = run(cfg, dataset=digits)
    assert r.final_accuracy >= 0.95, r.evals
