"""Pure tier: flat parameter buffers and the models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from apam_gossip.errors import UserError
from apam_gossip.flat import flatten
from apam_gossip.models import MODELS, build_model
from apam_gossip.optim import Optimizer

pytestmark = pytest.mark.timeout(60)

SHAPES = {"mlp": (1, 8, 8), "lenet5": (1, 28, 28), "allcnn": (3, 32, 32)}


@pytest.mark.parametrize("name", MODELS)
def test_views_survive_backward_and_match_autograd(name):
    torch.manual_seed(0)
    shape = SHAPES[name]
    model = build_model(name, shape, 10)
    ref = build_model(name, shape, 10)
    ref.load_state_dict(model.state_dict())
    flat = flatten(model)
    x, y = torch.randn(4, *shape), torch.randint(0, 10, (4,))
    for _ in range(2):  # twice: accumulation must stay in the buffer
        flat.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert flat.check_views()
    ref_grads = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    expect = torch.cat([g.reshape(-1) for g in ref_grads])
    assert torch.allclose(flat.grads, expect, atol=1e-6)
    assert flat.numel == sum(p.numel() for p in ref.parameters())


def test_stepping_the_flat_buffer_moves_the_model():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    flat = flatten(model)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    opt = Optimizer("amsgrad", lr=1e-2)
    st = opt.init(flat.params)
    losses = []
    for _ in range(50):
        flat.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
        opt.update(flat.params, flat.grads, st)
    assert losses[-1] < 0.2 * losses[0]


def test_lenet5_shapes_and_size():
    m = build_model("lenet5", (1, 28, 28), 10)
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert sum(p.numel() for p in m.parameters()) == 61706  # classic LeNet-5 on 28x28
    m = build_model("lenet5", (3, 32, 32), 10)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_allcnn_output():
    m = build_model("allcnn", (3, 32, 32), 10)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert not list(m.buffers())


def test_model_errors():
    with pytest.raises(UserError, match="lenet5 needs images of at least 28x28"):
        build_model("lenet5", (1, 8, 8), 10)
    with pytest.raises(UserError, match="unknown model 'resnet'"):
        build_model("resnet", (1, 8, 8), 10)


def test_deterministic_init():
    torch.manual_seed(5)
    a = flatten(build_model("lenet5", (1, 28, 28), 10)).params
    torch.manual_seed(5)
    b = flatten(build_model("lenet5", (1, 28, 28), 10)).params
    assert torch.equal(a, b)
