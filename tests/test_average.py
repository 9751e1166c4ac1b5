"""Pure tier: the pairwise average kernel (fused numba loop and the torch pair)."""

from __future__ import annotations

import pytest
import torch

from apam_gossip import average
from apam_gossip.average import FUSED_MIN_NUMEL, average_pair_


@pytest.mark.parametrize("fused", [False, True, None])
@pytest.mark.parametrize("numel", [1, 7, 1000, FUSED_MIN_NUMEL + 3])
def test_both_become_the_mean(fused, numel):
    g = torch.Generator().manual_seed(numel)
    a, b = torch.randn(numel, generator=g), torch.randn(numel, generator=g) * 3 + 1
    want = (a.double() + b.double()) / 2
    average_pair_(a, b, fused=fused)
    assert torch.equal(a, b)  # bitwise: the two sides of an average never drift apart
    torch.testing.assert_close(a.double(), want, rtol=1e-6, atol=1e-6)


def test_the_fused_loop_is_there_and_used_for_big_models(monkeypatch):
    """numba is a dependency: the fused loop must compile here, and a model of at least
    FUSED_MIN_NUMEL elements must go through it (not silently through torch)."""
    assert average.fused_available()
    calls = []
    kernel = average._fused()
    monkeypatch.setattr(average, "_fused", lambda: lambda a, b: (calls.append(a.size),
                                                                 kernel(a, b)))
    a, b = torch.ones(FUSED_MIN_NUMEL), torch.zeros(FUSED_MIN_NUMEL)
    average_pair_(a, b)
    average_pair_(a[:10], b[:10])  # small: the torch pair
    assert calls == [FUSED_MIN_NUMEL]
    assert float(a.sum()) == float(b.sum()) == FUSED_MIN_NUMEL / 2


def test_rows_of_a_shared_matrix_and_float64_and_views():
    """Rows of one matrix (the shared-memory layout) take the fused loop; float64 and
    strided views fall back to torch with the same result."""
    x = torch.arange(12, dtype=torch.float32).view(2, 6)
    average_pair_(x[0], x[1], fused=True)
    assert x[0].tolist() == x[1].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    y = torch.arange(12, dtype=torch.float64).view(2, 6)
    average_pair_(y[:, ::2][0], y[:, ::2][1], fused=True)
    assert y.tolist() == [[3.0, 1, 5, 3, 7, 5], [3.0, 7, 5, 9, 7, 11]]


def test_mismatched_tensors_are_refused():
    with pytest.raises(ValueError, match="differ"):
        average_pair_(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="differ"):
        average_pair_(torch.zeros(3), torch.zeros(3, dtype=torch.float64))
