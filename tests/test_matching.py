import pytest
import torch

from fedpsg.nn.matching import layer_distance, matching_distance


def grads(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 3, 3, generator=g), torch.randn(8, generator=g), torch.randn(10, 32, generator=g)]


def test_zero_for_identical_and_positive_scaled_gradients():
    a = grads(0)
    assert float(matching_distance(a, a)) < 1e-4
    assert float(matching_distance(a, [3.0 * g for g in a])) < 1e-4  # cosine ignores scale


def test_grows_as_gradients_diverge():
    a, b = grads(0), grads(1)
    mixes = [matching_distance(a, [(1 - t) * x + t * y for x, y in zip(a, b)]) for t in (0.0, 0.3, 0.6, 1.0)]
    assert all(float(lo) < float(hi) for lo, hi in zip(mixes, mixes[1:]))
    # opposite gradients: 1 - cos = 2 for every output unit (8 conv filters + 10 linear rows)
    assert float(matching_distance(a, [-g for g in a])) == pytest.approx(36.0, rel=1e-5)


def test_vectors_are_skipped_and_rows_are_separate():
    assert float(layer_distance(torch.randn(5), torch.randn(5))) == 0.0
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    synthetic = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # row 0 equal, row 1 orthogonal
    assert abs(float(layer_distance(real, synthetic)) - 1.0) < 1e-5
