"""A user's own torch optimizer behind DistributedOptimizer (issue 22, item 3): the step is
the user's (any class, its param groups, its scheduler) in every mode; the state_dict is
torch's format plus the job's; mistakes are one line. In-process tests first, then every
mode under a real `apam-gossip launch`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import apam_gossip as ag
from apam_gossip import loop
from apam_gossip.mpirun import mpi_env

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).parent.parent
SCRIPT = str(ROOT / "tests" / "mpi_scripts" / "wrapped.py")
MPIRUN = Path(sys.executable).parent / "mpirun"


@pytest.fixture(autouse=True)
def _fresh_session():
    loop._reset()
    yield
    loop._reset()


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g)
    return model, x, x.sum(1, keepdim=True).sin()


def train(model, opt, x, y, steps, sched=None):
    for k in range(steps):
        xb, yb = x[8 * (k % 8): 8 * (k % 8) + 8], y[8 * (k % 8): 8 * (k % 8) + 8]
        opt.zero_grad()
        nn.functional.mse_loss(model(xb), yb).backward()
        opt.step()
        if sched is not None:
            sched.step()


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def groups(model, cls=torch.optim.Adadelta, **kw):
    w = [p for n, p in model.named_parameters() if n.endswith("weight")]
    b = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return cls([{"params": w}, {"params": b, "lr": kw.pop("bias_lr")}], **kw)


@pytest.mark.parametrize("build", [
    lambda m: torch.optim.Adadelta(m.parameters(), lr=1.0),
    lambda m: groups(m, torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, bias_lr=0.01),
    lambda m: groups(m, torch.optim.AdamW, lr=1e-2, weight_decay=0.1, bias_lr=1e-3),
])
def test_one_process_steps_exactly_as_the_plain_torch_loop(build):
    """Any torch optimizer, its param groups and a scheduler on the wrapper: the same
    trajectory as the plain loop, to the bit."""
    ref, x, y = model_and_data()
    plain = build(ref)
    train(ref, plain, x, y, 20, torch.optim.lr_scheduler.StepLR(plain, 5, 0.5))
    ag.init(mode="allreduce")
    model, _, _ = model_and_data()
    opt = ag.DistributedOptimizer(build(model), model)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5, 0.5)
    train(model, opt, x, y, 20, sched)
    assert torch.equal(flat(model), flat(ref))
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in plain.param_groups]
    opt.finish(quiet=True)


def test_the_state_dict_is_torchs_format_and_resumes_exactly():
    ref, x, y = model_and_data()
    train(ref, torch.optim.Adam(ref.parameters(), lr=1e-2), x, y, 20)
    ag.init(mode="allreduce")
    model, _, _ = model_and_data()
    opt = ag.DistributedOptimizer(model, optimizer=torch.optim.Adam(model.parameters(),
                                                                   lr=1e-2))
    train(model, opt, x, y, 10)
    sd = opt.state_dict()
    assert sd["optimizer"] == "torch.optim.adam.Adam"
    twin, _, _ = model_and_data()  # torch's own loader takes it
    plain = torch.optim.Adam(twin.parameters(), lr=1e-2)
    plain.load_state_dict(sd)
    assert int(plain.state[next(iter(twin.parameters()))]["step"]) == 10
    opt.finish(quiet=True)
    ag.init(mode="allreduce")
    again, _, _ = model_and_data()
    opt2 = ag.DistributedOptimizer(torch.optim.Adam(again.parameters(), lr=1e-2), again)
    opt2.load_state_dict(sd)
    for k in range(10, 20):  # the same batches the uninterrupted run took
        xb, yb = x[8 * (k % 8): 8 * (k % 8) + 8], y[8 * (k % 8): 8 * (k % 8) + 8]
        opt2.zero_grad()
        nn.functional.mse_loss(again(xb), yb).backward()
        opt2.step()
    assert torch.equal(flat(again), flat(ref))
    opt2.finish(quiet=True)
    ag.init(mode="allreduce")  # a built-in's state is not a wrapped one's, and back
    other, _, _ = model_and_data()
    opt3 = ag.DistributedOptimizer(other, lr=1e-2)
    with pytest.raises(ag.LoopError, match="state is of optimizer 'torch.optim.adam.Adam'"):
        opt3.load_state_dict(sd)
    opt3.finish(quiet=True)


@pytest.mark.parametrize("call,needle", [
    (lambda m, o: ag.DistributedOptimizer(o), "give the model too"),
    (lambda m, o: ag.DistributedOptimizer(m, lr=0.1, optimizer=o),
     "its lr is its param groups'"),
    (lambda m, o: ag.DistributedOptimizer(o, m, momentum=0.9),
     "DistributedOptimizer\\(momentum=...\\) with a wrapped Adadelta"),
    (lambda m, o: ag.DistributedOptimizer(
        torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1), m),
     "holds a parameter of shape \\(3,\\) that is not a trained parameter"),
])
def test_mistakes_with_a_wrapped_optimizer_are_one_line(call, needle):
    ag.init(mode="allreduce")
    model, _, _ = model_and_data()
    with pytest.raises(ag.LoopError, match=needle):
        call(model, torch.optim.Adadelta(model.parameters()))


def test_a_tracked_second_moment_needs_the_built_in_amsgrad():
    ag.init(mode="decentralized", adaptive_state="tracked")
    model, _, _ = model_and_data()
    with pytest.raises(ag.LoopError, match="not a wrapped Adam"):
        ag.DistributedOptimizer(torch.optim.Adam(model.parameters()), model)


@pytest.mark.skipif(not MPIRUN.exists(), reason="mpirun not in the venv")
@pytest.mark.parametrize("mode,n", [("allreduce", 3), ("centralized", 2),
                                    ("decentralized", 3)])
def test_every_mode_steps_with_the_users_optimizer_under_launch(tmp_path, mode, n):
    """Adadelta with two param groups and a StepLR on the wrapper. All-reduce replicas
    on the same data, and one APAM worker whose master rebuilt the optimizer, follow the
    plain loop; gossip trains with Adadelta's own state on every rank."""
    env = {**mpi_env(), "PYTHONUNBUFFERED": "1"}
    subprocess.run([sys.executable, SCRIPT, mode, str(tmp_path), "--plain"], check=True,
                   timeout=60, env=env)
    plain = torch.load(tmp_path / "plain.pt")
    p = subprocess.run([sys.executable, "-m", "apam_gossip", "launch", "-n", str(n),
                        "--timeout", "150", SCRIPT, mode, str(tmp_path)],
                       capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    workers = n - 1 if mode == "centralized" else n
    for i in range(workers):
        w = torch.load(tmp_path / f"worker{i}.pt")
        assert w["state_keys"] == ["acc_delta", "square_avg", "step"]
        assert {"state", "param_groups", "x", "apam_gossip_loop"} <= set(w["keys"])
        assert w["lrs"] == [0.125, 0.0625]  # the scheduler's, on every rank
        diff = float((w["flat"] - plain["flat"]).abs().max())
        if mode == "decentralized":
            assert w["losses"][-1] < w["losses"][0]
        else:
            assert diff <= 1e-6, diff


def test_groups_in_another_order_than_the_model_and_model_zero_grad():
    """A decay / no-decay split lists the biases first; model.zero_grad() sets the grads
    to None: the gradients still land at the parameters' own places."""
    def build(m):
        w = [p for n, p in m.named_parameters() if n.endswith("weight")]
        b = [p for n, p in m.named_parameters() if n.endswith("bias")]
        return torch.optim.AdamW([{"params": b, "weight_decay": 0.0}, {"params": w}], lr=1e-2)

    ref, x, y = model_and_data()
    plain = build(ref)
    ag.init(mode="allreduce")
    model, _, _ = model_and_data()
    opt = ag.DistributedOptimizer(build(model), model)
    for m, o in ((ref, plain), (model, opt)):
        for k in range(10):
            m.zero_grad(set_to_none=True)
            nn.functional.mse_loss(m(x[8 * k % 64:][:8]), y[8 * k % 64:][:8]).backward()
            o.step()
    assert torch.equal(flat(model), flat(ref))
    opt.finish(quiet=True)


def test_a_resumed_scheduler_sees_the_loaded_lrs():
    ag.init(mode="allreduce")
    model, x, y = model_and_data()
    opt = ag.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    train(model, opt, x, y, 6, sched)
    sd, lr = opt.state_dict(), opt.param_groups[0]["lr"]
    opt.finish(quiet=True)
    ag.init(mode="allreduce")
    again, _, _ = model_and_data()
    opt2 = ag.DistributedOptimizer(torch.optim.SGD(again.parameters(), lr=0.1), again)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == lr == opt2.wrapped.param_groups[0]["lr"]
    opt2.finish(quiet=True)


def test_frozen_parameters_in_the_users_optimizer_are_left_alone():
    ag.init(mode="allreduce")
    model, x, y = model_and_data()
    model[0].weight.requires_grad_(False)  # fine-tuning: the first layer frozen
    before = model[0].weight.detach().clone()
    opt = ag.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    train(model, opt, x, y, 3)
    assert torch.equal(model[0].weight, before)
    opt.finish(quiet=True)
