"""Pure tier: optimizer math against torch's optimizers and a hand-written reference."""

from __future__ import annotations

import math

import pytest
import torch

from apam_gossip.optim import Optimizer, amsgrad_step

pytestmark = pytest.mark.timeout(60)


def _grads(n: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # varying scales so the running max of v actually matters (v shrinks between spikes)
    return [torch.randn(n, generator=g) * (5.0 if k % 7 == 0 else 0.3) for k in range(steps)]


def _run_ours(opt: Optimizer, x0: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    x = x0.clone()
    st = opt.init(x)
    for g in grads:
        opt.update(x, g, st)
    return x


def _run_torch(cls, kwargs, x0: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    p = torch.nn.Parameter(x0.clone())
    o = cls([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        o.step()
    return p.detach()


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_practical_amsgrad_matches_torch_adam_amsgrad(wd):
    x0 = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    grads = _grads(1000, 100)
    ours = _run_ours(Optimizer("amsgrad", lr=1e-2, bias_correction=True, weight_decay=wd),
                     x0, grads)
    ref = _run_torch(torch.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=wd), x0, grads)
    assert (ours - ref).abs().max().item() <= 1e-6
    assert (ours - x0).abs().max().item() > 0.1  # it really moved


def test_paper_amsgrad_matches_hand_reference_in_float64():
    n, steps, lr, b1, b2, eps = 50, 200, 1e-2, 0.9, 0.999, 1e-8
    x0 = torch.randn(n, generator=torch.Generator().manual_seed(2))
    grads = _grads(n, steps, seed=3)
    ours = _run_ours(Optimizer("amsgrad", lr=lr, bias_correction=False, eps=eps), x0, grads)
    x = x0.double().tolist()
    m, v, vh = [0.0] * n, [0.0] * n, [0.0] * n
    for g in grads:
        for i, gi in enumerate(g.double().tolist()):
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            vh[i] = max(vh[i], v[i])
            x[i] -= lr * m[i] / (math.sqrt(vh[i]) + eps)
    assert (ours.double() - torch.tensor(x)).abs().max().item() <= 1e-5


def test_variants_differ():
    x0 = torch.zeros(10)
    grads = _grads(10, 5)
    a = _run_ours(Optimizer("amsgrad", bias_correction=True), x0, grads)
    b = _run_ours(Optimizer("amsgrad", bias_correction=False), x0, grads)
    assert (a - b).abs().max().item() > 1e-4


def test_paper_variant_eps_zero_leaves_zero_gradient_coordinates_unchanged():
    x = torch.ones(4)
    m, v, vh = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    g = torch.tensor([1.0, 0.0, -2.0, 0.0])
    amsgrad_step(x, g, m, v, vh, step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=0.0,
                 bias_correction=False)
    assert torch.isfinite(x).all()
    assert x[1] == 1.0 and x[3] == 1.0 and x[0] < 1.0 and x[2] > 1.0


def test_running_max_is_monotone():
    opt = Optimizer("amsgrad")
    x = torch.zeros(100)
    st = opt.init(x)
    prev = st["vhat"].clone()
    for g in _grads(100, 30):
        opt.update(x, g, st)
        assert (st["vhat"] >= prev).all()
        assert (st["vhat"] >= st["v"]).all()
        prev = st["vhat"].clone()
    assert int(st["step"]) == 30


def test_adam_matches_torch():
    x0 = torch.randn(300)
    grads = _grads(300, 100)
    ours = _run_ours(Optimizer("adam", lr=3e-3), x0, grads)
    ref = _run_torch(torch.optim.Adam, dict(lr=3e-3), x0, grads)
    assert (ours - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_matches_torch(momentum, nesterov):
    x0 = torch.randn(300)
    grads = _grads(300, 100)
    ours = _run_ours(Optimizer("sgd", lr=1e-2, momentum=momentum, nesterov=nesterov,
                               weight_decay=1e-3), x0, grads)
    ref = _run_torch(torch.optim.SGD, dict(lr=1e-2, momentum=momentum, nesterov=nesterov,
                                           weight_decay=1e-3), x0, grads)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_lr_override():
    x0 = torch.zeros(3)
    g = [torch.ones(3)]
    opt = Optimizer("sgd", lr=1.0)
    x = x0.clone()
    st = opt.init(x)
    opt.update(x, g[0], st, lr=0.5)
    assert torch.allclose(x, torch.full((3,), -0.5))


@pytest.mark.parametrize("bias_correction", [False, True])
def test_damsgrad_matches_hand_reference_in_float64(bias_correction):
    """The tracked-second-moment step: u moves by this worker's change of vhat and the
    denominator uses max(u, 0). Between steps u is perturbed, as averages with neighbors
    would (including to negative values, where the clamp matters)."""
    n, steps, lr, b1, b2, eps = 40, 120, 1e-2, 0.9, 0.999, 1e-8
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(n, generator=gen, dtype=torch.float64)
    grads = [g.double() for g in _grads(n, steps, seed=6)]
    kicks = [0.02 * torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(steps)]
    opt = Optimizer("amsgrad", lr=lr, bias_correction=bias_correction, eps=eps)
    x, u = x0.clone(), torch.zeros(n, dtype=torch.float64)
    st = opt.init(x)
    for g, kick in zip(grads, kicks, strict=True):
        u += kick  # a neighbor's average moved u
        opt.update(x, g, st, tracked=u)
    xr, ur = x0.tolist(), [0.0] * n
    m, v, vh = [0.0] * n, [0.0] * n, [0.0] * n
    clamped = 0
    for t, (g, kick) in enumerate(zip(grads, kicks, strict=True), start=1):
        for i, gi in enumerate(g.tolist()):
            ur[i] += float(kick[i])
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            old = vh[i]
            vh[i] = max(vh[i], v[i])
            ur[i] += vh[i] - old
            clamped += ur[i] < 0
            second = max(ur[i], 0.0)
            if bias_correction:
                denom = math.sqrt(second) / math.sqrt(1 - b2**t) + eps
                xr[i] -= lr / (1 - b1**t) * m[i] / denom
            else:
                xr[i] -= lr * m[i] / (math.sqrt(second) + eps)
    # u agrees to rounding; x to 1e-6 (u near 0 sits under a square root, which magnifies
    # the rounding of u by orders of magnitude; a wrong formula is off by > 1e-2)
    assert (u - torch.tensor(ur, dtype=torch.float64)).abs().max().item() <= 1e-12
    assert (x - torch.tensor(xr, dtype=torch.float64)).abs().max().item() <= 1e-6
    assert clamped > 0  # the clamp was exercised
    assert (x - x0).abs().max().item() > 0.1


def test_learning_rate_schedules():
    from apam_gossip.optim import scheduled_lr

    assert [scheduled_lr(0.1, "constant", k, 4) for k in (1, 4)] == [0.1, 0.1]
    cos = [scheduled_lr(0.1, "cosine", k, 4) for k in range(1, 5)]
    assert cos[0] == pytest.approx(0.1) and cos[2] == pytest.approx(0.05)
    assert all(a > b > 0 for a, b in zip(cos, cos[1:], strict=False))  # decays, never 0
    lin = [scheduled_lr(0.1, "linear", k, 4) for k in range(1, 5)]
    assert lin == pytest.approx([0.1, 0.075, 0.05, 0.025])
    opt = Optimizer("sgd", lr=0.1, schedule="linear")
    x, g = torch.zeros(3), torch.ones(3)
    st = opt.init(x)
    for k in range(1, 5):
        opt.update(x, g, st, lr=opt.lr_at(k, 4))
    assert torch.allclose(x, torch.full((3,), -0.25))


def test_warmup_and_the_staleness_aware_step():
    from apam_gossip.optim import scheduled_lr, staleness_scale

    # 10% of 100 updates: lr/10, 2 lr/10, ..., then the schedule's own value
    warm = [scheduled_lr(0.1, "constant", k, 100, warmup=0.1) for k in (1, 5, 10, 11, 100)]
    assert warm == pytest.approx([0.01, 0.05, 0.1, 0.1, 0.1])
    cos = scheduled_lr(0.1, "cosine", 5, 100, warmup=0.1)
    assert cos == pytest.approx(0.5 * scheduled_lr(0.1, "cosine", 5, 100))
    assert scheduled_lr(0.1, "constant", 1, 5, warmup=0.1) == 0.1  # shorter than 1 update
    assert [staleness_scale(r, 3) for r in ("none", "sqrt", "inverse")] == \
        pytest.approx([1.0, 0.5, 0.25])
    assert staleness_scale("inverse", 0) == 1.0
    opt = Optimizer("amsgrad", lr=0.1, warmup=0.1, staleness_lr="sqrt")
    assert opt.lr_at(5, 100, staleness=8) == pytest.approx(0.05 / 3)


def test_the_master_shortens_its_momentum_by_the_number_of_workers():
    """Asynchrony adds momentum: the master's beta1 becomes max(0, 1 - (1 - beta1) n);
    one worker, rule none, or SGD (its momentum buffer must not depend on n) keep the
    given values."""
    from apam_gossip.config import OptimConfig
    from apam_gossip.optim import for_async_master, staleness_momentum

    assert staleness_momentum("workers", 0.9, 8) == pytest.approx(0.2)
    assert staleness_momentum("workers", 0.9, 4) == pytest.approx(0.6)
    assert staleness_momentum("workers", 0.9, 20) == 0.0
    assert staleness_momentum("workers", 0.9, 1) == 0.9
    assert staleness_momentum("none", 0.9, 8) == 0.9
    hp = OptimConfig(lr=0.1, beta1=0.8)
    got = for_async_master(hp, 3)
    assert got.beta1 == pytest.approx(0.4) and got.lr == 0.1 and got.beta2 == hp.beta2
    assert for_async_master(hp, 1) is hp
    for keep in (OptimConfig(staleness_momentum="none"),
                 OptimConfig(name="sgd", lr=0.1, momentum=0.9)):
        assert for_async_master(keep, 8) is keep


def test_the_gossip_lr_factor():
    from apam_gossip.optim import gossip_lr_factor

    assert gossip_lr_factor("none", 8) == 1.0
    assert gossip_lr_factor("workers", 8) == 8.0
    assert gossip_lr_factor("sqrt", 16) == 4.0
    assert gossip_lr_factor("workers", 1) == 1.0


def test_the_lookahead_point_is_where_steps_of_the_same_course_lead():
    """With a constant gradient, AMSGrad's (and Adam's) corrected direction is constant,
    so the point ``k`` updates ahead is where k more steps take the model; a fresh state,
    SGD or 0 updates give the model as it is."""
    from apam_gossip.config import OptimConfig
    from apam_gossip.optim import lookahead_point

    g = torch.tensor([0.5, -2.0, 1e-3, 0.0], dtype=torch.float64)
    for name, bias in (("amsgrad", True), ("amsgrad", False), ("adam", True)):
        hp = OptimConfig(name=name, lr=0.01, bias_correction=bias, eps=1e-8)
        opt = Optimizer(hp)
        x = torch.zeros(4, dtype=torch.float64)
        state = opt.init(x)
        out = torch.empty_like(x)
        assert torch.equal(lookahead_point(out, x, state, hp, 0.01, 3), x)  # no step yet
        for _ in range(5):
            opt.update(x, g, state)
        ahead = lookahead_point(torch.empty_like(x), x, state, hp, 0.01, 3).clone()
        if bias:  # the corrected moments are exactly g and g^2: the course is straight
            y, s = x.clone(), {k: v.clone() for k, v in state.items()}
            for _ in range(3):
                opt.update(y, g, s)
            assert torch.allclose(ahead, y, rtol=0, atol=1e-12), (ahead, y)
        m, v = state["m"], state["vhat"] if name == "amsgrad" else state["v"]
        t = int(state["step"])
        if bias:
            want = x - 0.03 / (1 - 0.9**t) * m / (v.sqrt() / (1 - 0.999**t) ** 0.5 + 1e-8)
        else:
            want = x - 0.03 * m / (v.sqrt() + 1e-8)
        assert torch.allclose(ahead, want, rtol=1e-12, atol=0)
        assert torch.equal(lookahead_point(out, x, state, hp, 0.01, 0), x)
    sgd = OptimConfig(name="sgd", lr=0.1, momentum=0.9)
    st = Optimizer(sgd).init(torch.zeros(4))
    st["step"] += 1
    assert torch.equal(lookahead_point(torch.empty(4), torch.ones(4), st, sgd, 0.1, 3),
                       torch.ones(4))
