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


def test_buffers_travel_in_the_state_and_frozen_parameters_stay_out():
    """[params | float buffers]: BatchNorm's running statistics are views into the state
    (the forward pass moves them there); a frozen layer and num_batches_tracked are not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3),
                                torch.nn.Linear(3, 2))
    model[2].requires_grad_(False)
    flat = flatten(model)
    assert flat.n_params == 4 * 3 + 3 + 3 + 3  # linear 1 and the BatchNorm affine
    assert flat.n_buffers == 3 + 3  # running mean and variance
    assert flat.numel == flat.n_params + flat.n_buffers
    before = flat.buffers.clone()
    model.train()
    F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
    assert not torch.equal(flat.buffers, before)  # running statistics moved in the state
    assert torch.equal(flat.buffers[:3], model[1].running_mean)
    msg = flat.pack_grad_msg()
    assert torch.equal(msg[flat.n_params:], flat.buffers) and msg.numel() == flat.numel
    assert model[2].weight.grad is None  # frozen: no gradient, not in the state


def test_complex_parameters_are_refused():
    m = torch.nn.Linear(2, 2)
    m.z = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(UserError, match="parameter 'z' is complex"):
        flatten(m)


def test_sparse_gradients_are_accumulated_densely_and_correctly():
    """nn.Embedding(sparse=True): autograd adds its sparse gradient into the dense flat
    buffer in place, so the model trains correctly (without the memory saving)."""
    torch.manual_seed(0)
    model = torch.nn.Embedding(10, 4, sparse=True)
    ref = torch.nn.Embedding(10, 4)
    ref.load_state_dict(model.state_dict())
    flat = flatten(model)
    idx = torch.tensor([1, 3, 3, 7])
    model(idx).pow(2).sum().backward()
    ref(idx).pow(2).sum().backward()
    assert flat.check_views() and torch.allclose(flat.grads, ref.weight.grad.reshape(-1))
