"""Skew-symmetric parameters -> rotations: sign convention, orthogonality, the approximations,
and float64 computation whatever the parameters' dtype."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ssvd_peft.layers.rotation import num_skew_params, rotation_from_skew, skew_from_params

EXACT = ["cayley", "expm"]
ALL = ["cayley", "neumann", "expm", "first_order"]


def random_skew(k: int, std: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """S = L - L^T with L strictly lower-triangular, entries ~ N(0, std^2)."""
    params = torch.randn(num_skew_params(k), dtype=dtype) * std
    return skew_from_params(params, k)


def orthogonality_error(rotation: torch.Tensor) -> float:
    eye = torch.eye(rotation.shape[0], dtype=rotation.dtype)
    return float(torch.linalg.matrix_norm(rotation @ rotation.T - eye, ord=2))


@pytest.mark.parametrize("k", [0, 1, 2, 5, 32])
def test_parameter_count_is_k_choose_2(k):
    assert num_skew_params(k) == k * (k - 1) // 2
    assert num_skew_params(k) == torch.triu_indices(k, k, offset=1).shape[1]


def test_skew_from_params_sign_convention():
    a, b, c = 1.0, 2.0, 3.0  # pairs (0, 1), (0, 2), (1, 2): triu_indices order
    expected = torch.tensor([[0.0, -a, -b], [a, 0.0, -c], [b, c, 0.0]])
    torch.testing.assert_close(skew_from_params(torch.tensor([a, b, c]), 3), expected, rtol=0, atol=0)


def test_skew_from_params_is_skew_symmetric_and_places_each_parameter_once():
    k = 7
    params = torch.randn(num_skew_params(k))
    skew = skew_from_params(params, k)
    torch.testing.assert_close(skew.T, -skew, rtol=0, atol=0)
    rows, cols = torch.triu_indices(k, k, offset=1)
    torch.testing.assert_close(skew[cols, rows], params, rtol=0, atol=0)
    torch.testing.assert_close(skew[rows, cols], -params, rtol=0, atol=0)


def test_skew_from_params_passes_gradients_to_the_parameters():
    params = torch.randn(num_skew_params(4), requires_grad=True)
    weights = torch.randn(4, 4)
    (skew_from_params(params, 4) * weights).sum().backward()
    rows, cols = torch.triu_indices(4, 4, offset=1)
    torch.testing.assert_close(params.grad, weights[cols, rows] - weights[rows, cols])


@pytest.mark.parametrize("method", ALL)
def test_every_rotation_is_the_identity_at_zero(method):
    skew = torch.zeros(6, 6)
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(rotation_from_skew(skew, method), eye, rtol=0, atol=0)


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("k", [8, 32])
def test_exact_rotations_are_orthogonal_for_large_angles(method, k):
    skew = random_skew(k, std=1.0)
    rotation = rotation_from_skew(skew, method)
    assert orthogonality_error(rotation) < 1e-12
    assert float(torch.linalg.det(rotation)) == pytest.approx(1.0, abs=1e-10)
    assert float(torch.linalg.matrix_norm(rotation - torch.eye(k))) > 1.0, "a real rotation, not ~I"


@pytest.mark.parametrize("method", EXACT)
def test_float32_parameters_at_large_angles_give_rotations_orthogonal_to_float32_precision(method):
    """k = 32, skew entries ~ N(0, 3^2): a float32 solve / exponential lost 1e-5 .. 1e-3 here."""
    torch.manual_seed(0)
    rotation = rotation_from_skew(random_skew(32, std=3.0), method)
    assert rotation.dtype == torch.float64
    assert orthogonality_error(rotation) < 1e-12
    assert orthogonality_error(rotation.float()) < 2e-6


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_skew_gives_a_finite_float64_rotation(method, dtype):
    """CPU torch has no LU solve in bfloat16, and matrix_exp in half precision overflows."""
    skew = random_skew(16, std=2.0).to(dtype)
    rotation = rotation_from_skew(skew, method)
    assert rotation.dtype == torch.float64 and bool(torch.isfinite(rotation).all())
    reference = rotation_from_skew(skew.double(), method)
    torch.testing.assert_close(rotation, reference, rtol=0, atol=0)


def test_cayley_is_the_cayley_transform():
    skew = random_skew(8, dtype=torch.float64)
    eye = torch.eye(8, dtype=torch.float64)
    rotation = rotation_from_skew(skew, "cayley")
    torch.testing.assert_close((eye - skew) @ rotation, eye + skew)


def test_expm_is_the_matrix_exponential():
    skew = random_skew(8, std=0.3, dtype=torch.float64)
    series = sum(torch.linalg.matrix_power(skew, n) / float(math.factorial(n)) for n in range(30))
    torch.testing.assert_close(rotation_from_skew(skew, "expm"), series)


def test_neumann_approaches_cayley_as_terms_grow():
    skew = random_skew(8, std=0.05, dtype=torch.float64)
    assert float(torch.linalg.matrix_norm(skew, ord=2)) < 1.0, "the Neumann series needs ||S|| < 1"
    cayley = rotation_from_skew(skew, "cayley")
    errors = [
        float(torch.linalg.matrix_norm(rotation_from_skew(skew, "neumann", terms) - cayley))
        for terms in range(1, 9)
    ]
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))
    assert errors[-1] < 1e-3 * errors[0]


def test_neumann_is_near_orthogonal_for_small_angles():
    skew = random_skew(16, std=0.01)
    rotation = rotation_from_skew(skew, "neumann", neumann_terms=4)
    assert orthogonality_error(rotation) < 1e-5
    assert orthogonality_error(rotation_from_skew(skew * 20, "neumann", 4)) > 1e-5, "not exact in general"


def test_first_order_is_i_plus_2s_and_not_orthogonal():
    skew = random_skew(8, std=0.3)
    eye = torch.eye(8)
    rotation = rotation_from_skew(skew, "first_order").float()
    torch.testing.assert_close(rotation, eye + 2 * skew, rtol=0, atol=0)
    torch.testing.assert_close(rotation @ rotation.T, eye - 4 * skew @ skew)
    assert orthogonality_error(rotation) > 0.1


def test_unknown_rotation_is_refused():
    with pytest.raises(ValueError, match="unknown rotation 'givens'"):
        rotation_from_skew(torch.zeros(3, 3), "givens")
