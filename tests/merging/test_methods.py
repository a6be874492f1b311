"""The merge methods against the invariants of their definitions (../shared/specs/merging.md)."""

from __future__ import annotations

import math

import pytest
import torch

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.merging import get_merge_method, merge_method_names
from ssvd_peft.merging.ops import dare, elected_sign, polar_factor, working_dtype

TASK_VECTOR_METHODS = ["task_arithmetic", "ties", "sce", "pcb", "iso_c", "tsv_m", "boosted_tsv_m", "knots"]
EXACT_FOR_ONE_MODEL = {
    "task_arithmetic": {},
    "ties": {"density": 1.0},
    "sce": {},
    "pcb": {"density": 1.0},
    "knots": {"density": 1.0},
    "tsv_m": {"keep": 1.0},
    "model_stock": {},
    "soup": {},
    "karcher": {},
    "multislerp": {},
}


def merge(name: str, base, tensors, weights=None, seed: int = 0, **knobs):
    """The method on these tensors as the engine calls it: stacked, in the working dtype."""
    method = get_merge_method(name)
    dtype = working_dtype(tensors[0])
    models = torch.stack([tensor.to(dtype) for tensor in tensors])
    w = torch.tensor(weights or [1.0] * len(tensors), dtype=dtype)
    return method.function(
        None if base is None else base.to(dtype),
        models,
        w,
        generator=torch.Generator().manual_seed(seed),
        **method.resolved_knobs(knobs),
    )


@pytest.fixture
def models():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(12, 8, generator=generator, dtype=torch.float64)
    return base, [base + 0.1 * torch.randn(12, 8, generator=generator, dtype=torch.float64) for _ in range(3)]


def test_every_method_of_the_spec_is_registered():
    expected = {"soup", "model_stock", "karcher", "multislerp", "task_arithmetic", "ties", "pcb", "sce"}
    expected |= {"iso_c", "iso_cts", "tsv_m", "boosted_tsv_m", "knots"}
    assert expected <= set(merge_method_names())


@pytest.mark.parametrize("name", list(EXACT_FOR_ONE_MODEL))
def test_one_model_merges_to_itself(name, models):
    base, tensors = models
    merged = merge(name, base, tensors[:1], **EXACT_FOR_ONE_MODEL[name])
    torch.testing.assert_close(merged, tensors[0], rtol=1e-9, atol=1e-9)


def test_soup_of_identical_models_is_that_model_and_of_two_their_mean(models):
    _, tensors = models
    torch.testing.assert_close(merge("soup", None, [tensors[0]] * 3), tensors[0])
    torch.testing.assert_close(
        merge("soup", None, tensors[:2], [1.0, 3.0]), 0.25 * tensors[0] + 0.75 * tensors[1]
    )


def test_task_arithmetic_is_the_scaled_weighted_sum_of_task_vectors(models):
    base, tensors = models
    merged = merge("task_arithmetic", base, tensors, [1.0, 0.5, 2.0], scaling=0.3)
    expected = base + 0.3 * ((tensors[0] - base) + 0.5 * (tensors[1] - base) + 2.0 * (tensors[2] - base))
    torch.testing.assert_close(merged, expected)


def test_ties_elects_the_sign_and_takes_the_disjoint_mean():
    base = torch.zeros(4, dtype=torch.float64)
    taus = [
        torch.tensor([3.0, -1.0, 2.0, 0.0]),
        torch.tensor([1.0, 2.0, -3.0, 0.0]),
        torch.tensor([-1.0, 2.0, 2.0, 0.0]),
    ]
    merged = merge("ties", base, [t.double() for t in taus], density=1.0)
    # entry 0: sum 3 > 0, agreeing 3 and 1 -> 2; entry 1: sum 3 > 0, agreeing 2, 2 -> 2;
    # entry 2: sum 1 > 0, agreeing 2, 2 -> 2; entry 3: nothing agrees -> 0
    torch.testing.assert_close(merged, torch.tensor([2.0, 2.0, 2.0, 0.0], dtype=torch.float64))
    trimmed = merge("ties", base, [torch.tensor([3.0, -1.0, 0.5, 0.2], dtype=torch.float64)], density=0.5)
    torch.testing.assert_close(trimmed, torch.tensor([3.0, -1.0, 0.0, 0.0], dtype=torch.float64))


def test_a_zero_sign_sum_takes_the_sign_of_the_tensor_total():
    gamma = elected_sign(torch.tensor([1.0, 5.0]) + torch.tensor([-1.0, 1.0]))
    assert gamma.tolist() == [1.0, 1.0]
    gamma = elected_sign(torch.tensor([1.0, -5.0]) + torch.tensor([-1.0, 1.0]))
    assert gamma.tolist() == [-1.0, -1.0]


def test_dare_is_reproducible_under_a_seed_and_unbiased():
    tau = torch.randn(2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first = dare(tau.clone(), 0.7, torch.Generator().manual_seed(5))
    assert torch.equal(first, dare(tau.clone(), 0.7, torch.Generator().manual_seed(5)))
    assert 0.6 < float((first == 0).double().mean()) < 0.8
    draws = torch.stack([dare(tau.clone(), 0.7, torch.Generator().manual_seed(seed)) for seed in range(400)])
    assert float((draws.mean(0) - tau).abs().mean()) < 0.1 * float(tau.abs().mean())


def test_model_stock_ratio_on_two_task_vectors_of_known_angle():
    angle = math.pi / 3
    base = torch.zeros(2, dtype=torch.float64)
    tensors = [
        torch.tensor([1.0, 0.0], dtype=torch.float64),
        torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64),
    ]
    ratio = 2 * math.cos(angle) / (1 + math.cos(angle))
    torch.testing.assert_close(merge("model_stock", base, tensors), ratio * (tensors[0] + tensors[1]) / 2)


def test_karcher_mean_of_two_points_is_their_midpoint_on_the_sphere():
    a = torch.tensor([2.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 4.0], dtype=torch.float64)
    merged = merge("karcher", None, [a, b])
    torch.testing.assert_close(merged, 3.0 * torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2))


def test_multislerp_of_two_unit_vectors_is_the_spherical_midpoint():
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0], dtype=torch.float64)
    merged = merge("multislerp", None, [a, b])
    assert float(merged.norm()) == pytest.approx(1.0)
    assert float(merged[0]) == pytest.approx(float(merged[1]))


def test_iso_c_has_a_flat_spectrum_and_the_task_directions(models):
    base, tensors = models
    merged = merge("iso_c", base, tensors[:1]) - base
    values = torch.linalg.svdvals(merged)
    torch.testing.assert_close(values, values.mean().expand_as(values))
    u, s, vh = torch.linalg.svd(tensors[0] - base, full_matrices=False)
    torch.testing.assert_close(merged, s.mean() * u @ vh)
    torch.testing.assert_close(values.mean(), s.mean())


def test_iso_cts_of_one_task_with_all_common_directions_is_iso_c(models):
    base, tensors = models
    torch.testing.assert_close(
        merge("iso_cts", base, tensors[:1], common_fraction=1.0), merge("iso_c", base, tensors[:1])
    )
    merged = merge("iso_cts", base, tensors) - base
    values = torch.linalg.svdvals(merged)
    torch.testing.assert_close(values, values.mean().expand_as(values), rtol=1e-6, atol=1e-9)


def test_iso_cts_adds_each_tasks_top_residual_outside_the_common_subspace(models):
    """Spelled out for 3 tasks of 12 x 8 (r = 8) with common_fraction 0.5: k_c = 4 lowered to 2 so
    that 3 divides 8 - k_c, then 2 directions per task from tau_t - U_c U_c^T tau_t."""
    base, tensors = models
    taus = [t - base for t in tensors]
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    common_u, us, vhs, values = u[:, :2], [u[:, :2]], [vh[:2]], [s[:2]]
    for tau in taus:
        ru, rs, rvh = torch.linalg.svd(tau - common_u @ (common_u.T @ tau), full_matrices=False)
        us.append(ru[:, :2])
        vhs.append(rvh[:2])
        values.append(rs[:2])
    expected = torch.cat(values).mean() * (polar_factor(torch.cat(us, 1)) @ polar_factor(torch.cat(vhs, 0)))
    torch.testing.assert_close(merge("iso_cts", base, tensors, common_fraction=0.5) - base, expected)


def orthogonal_task_vectors(count: int = 3, rank: int = 2) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Task vectors on mutually orthogonal input and output subspaces (rank ``rank`` each)."""
    generator = torch.Generator().manual_seed(3)
    left, _ = torch.linalg.qr(torch.randn(12, count * rank, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(10, count * rank, generator=generator, dtype=torch.float64))
    base = torch.randn(12, 10, generator=generator, dtype=torch.float64)
    taus = []
    for t in range(count):
        block = slice(t * rank, (t + 1) * rank)
        values = torch.rand(rank, generator=generator, dtype=torch.float64) + 0.5
        taus.append(left[:, block] @ torch.diag(values) @ right[:, block].T)
    return base, [base + tau for tau in taus]


def test_tsv_m_with_every_direction_on_orthogonal_tasks_is_the_sum_of_task_vectors():
    base, tensors = orthogonal_task_vectors()
    merged = merge("tsv_m", base, tensors, keep=1.0)
    torch.testing.assert_close(merged - base, sum(t - base for t in tensors))


def test_boosted_tsv_m_at_beta_one_is_tsv_m_and_boosts_below(models):
    base, tensors = models
    tsv = merge("tsv_m", base, tensors, keep=0.5)
    torch.testing.assert_close(merge("boosted_tsv_m", base, tensors, keep=0.5, beta=1.0), tsv)
    boosted = merge("boosted_tsv_m", base, tensors, keep=0.5, beta=0.3)
    assert float((boosted - base).norm()) > float((tsv - base).norm())


def test_newton_schulz_is_near_the_svd_polar_factor_with_singular_values_in_its_band():
    matrix = torch.randn(10, 24, generator=torch.Generator().manual_seed(4))
    exact = polar_factor(matrix, "svd")
    approximate = polar_factor(matrix, "newton_schulz")
    values = torch.linalg.svdvals(approximate)
    assert float(values.min()) > 0.6 and float(values.max()) < 1.25
    assert float((approximate - exact).norm() / exact.norm()) < 0.3
    tall = polar_factor(matrix.T, "newton_schulz")
    torch.testing.assert_close(tall, approximate.T)


def test_knots_merges_in_the_shared_basis_of_the_deltas(models):
    base, tensors = models
    knots_ta = merge("knots", base, tensors, density=1.0)
    # with no trimming and agreeing signs everywhere the aligned merge is a mean of the deltas' blocks
    assert knots_ta.shape == base.shape
    low_rank = [
        base + torch.outer(torch.randn(12, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
        for _ in range(2)
    ]
    merged = merge("knots", base, low_rank, density=1.0) - base
    assert int(torch.linalg.matrix_rank(merged)) <= 2


def test_unknown_methods_and_knobs_are_named_with_the_known_ones():
    with pytest.raises(PeftConfigError, match=r"unknown merge method 'tise'.*Did you mean 'ties'"):
        get_merge_method("tise")
    with pytest.raises(PeftConfigError, match=r"'ties' has no knob 'densty'.*Did you mean 'density'"):
        get_merge_method("ties").resolved_knobs({"densty": 0.5})


@pytest.mark.parametrize("name", merge_method_names())
def test_half_precision_inputs_merge_in_float32(name, models):
    base, tensors = models
    half = [t.to(torch.bfloat16) for t in tensors]
    merged = merge(name, base.to(torch.bfloat16), half)
    assert merged.dtype == torch.float32 and bool(torch.isfinite(merged).all())


def knots_by_explicit_svd(base, tensors, density):
    """KnOTS written out: SVD of the deltas side by side, truncated to the non-zero spectrum, TIES
    over the aligned blocks diag(s) Z_t, mapped back with U."""
    taus = [(t - base).to(torch.float64) for t in tensors]
    u, s, vh = torch.linalg.svd(torch.cat(taus, dim=1), full_matrices=False)
    rank = int((s > 1e-6 * s[0]).sum())
    blocks = (s[:rank, None] * vh[:rank]).reshape(rank, len(taus), -1).permute(1, 0, 2).clone()
    for block in blocks:
        if density < 1.0:
            count = round(density * block.numel())
            threshold = block.abs().flatten().kthvalue(block.numel() - count + 1).values
            block.mul_(block.abs() >= threshold)
    gamma = torch.sign(blocks.sum(0))
    agree = (blocks.sign() == gamma).to(blocks.dtype)
    merged = (agree * blocks).sum(0) / agree.sum(0).clamp_min(1.0)
    return base.to(torch.float64) + u[:, :rank] @ merged


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (30, 30), (40, 6)], ids=str)
@pytest.mark.parametrize("low_rank", [False, True], ids=["dense", "rank2"])
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_knots_equals_the_explicit_svd_of_the_deltas_side_by_side(shape, low_rank, density):
    """Wide stacks go through sum_t tau_t tau_t^T, tall ones (40 x 6, T = 3) through the kernel."""
    generator = torch.Generator().manual_seed(sum(shape) + low_rank)
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    if low_rank:
        deltas = [
            torch.randn(shape[0], 2, generator=generator, dtype=torch.float64)
            @ torch.randn(2, shape[1], generator=generator, dtype=torch.float64)
            for _ in range(3)
        ]
    else:
        deltas = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3)]
    tensors = [base + delta for delta in deltas]
    merged = merge("knots", base, tensors, density=density)
    torch.testing.assert_close(merged, knots_by_explicit_svd(base, tensors, density), rtol=1e-6, atol=1e-6)
