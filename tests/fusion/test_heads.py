"""The fusion heads: shapes, their formulas at initialisation, parameter counts, masks, bad taps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.fusion import (
    FusionConfig,
    Grouped,
    Ladder,
    LayerConv,
    WeightedSum,
    build_fusion_head,
    fusion_head_names,
)

DIM = 16
TAPS = [0, 2, 3, 5, 6]
VARIANTS = ["weighted_sum", "grouped", "ladder", "layer_conv"]


def random_taps(count: int = len(TAPS), batch: int = 2, frames: int = 7) -> list[torch.Tensor]:
    return [3 * torch.randn(batch, frames, DIM) + index for index in range(count)]


def head(variant: str, out_dim: int | None = None, taps: list[int] = TAPS, **options):
    config = FusionConfig(variant=variant, out_dim=out_dim, **{"reduction": 4, "groups": 2, **options})
    return build_fusion_head(config, DIM, taps).eval()


def test_the_four_variants_are_registered() -> None:
    assert sorted(fusion_head_names()) == sorted(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("out_dim", [None, 12])
def test_each_head_maps_taps_to_batch_frames_out_dim(variant: str, out_dim: int | None) -> None:
    fusion = head(variant, out_dim)
    z = fusion(random_taps(), torch.ones(2, 7, dtype=torch.bool))
    assert z.shape == (2, 7, out_dim or DIM)
    assert fusion.out_dim == (out_dim or DIM)


def closed_form_count(variant: str, taps: int, dim: int, out: int) -> int:
    """The trainable-parameter formulas of the heads' docstrings (reduction 4, groups 2, kernel 3)."""
    d = dim // 4
    if variant == "weighted_sum":
        return taps + (dim * out + out if out != dim else 0)
    if variant == "grouped":
        return taps + 2 * dim * out + out
    if variant == "ladder":
        return taps * dim * d + (taps - 1) * (12 * d * d + 13 * d + 1) + 2 * d + d * out + out
    halvings = (taps - 1).bit_length()
    return halvings * (3 * dim * dim + dim) + dim * out + out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("out_dim", [DIM, 12])
def test_parameter_count_is_the_documented_formula(variant: str, out_dim: int) -> None:
    fusion = head(variant, out_dim)
    assert sum(p.numel() for p in fusion.parameters()) == closed_form_count(variant, len(TAPS), DIM, out_dim)


def test_weighted_sum_of_one_tap_at_init_is_that_taps_layer_norm() -> None:
    (tap,) = random_taps(1)
    z = WeightedSum(1, DIM, DIM)([tap])
    assert torch.equal(z, F.layer_norm(tap, (DIM,)))
    assert torch.allclose(z, torch.nn.LayerNorm(DIM, elementwise_affine=False)(tap))


def test_weighted_sum_of_several_taps_at_init_is_the_mean_of_the_normalised_taps() -> None:
    taps = random_taps()
    z = WeightedSum(len(taps), DIM, DIM)(taps)
    expected = torch.stack([F.layer_norm(tap, (DIM,)) for tap in taps]).mean(dim=0)
    torch.testing.assert_close(z, expected)


def test_weighted_sum_weights_are_a_softmax() -> None:
    taps = random_taps(3)
    fusion = WeightedSum(3, DIM, DIM)
    with torch.no_grad():
        fusion.weighted_sum.weights.copy_(torch.tensor([0.0, 1.0, 2.0]))
    weights = torch.tensor([0.0, 1.0, 2.0]).softmax(dim=0)
    expected = sum(w * F.layer_norm(tap, (DIM,)) for w, tap in zip(weights, taps, strict=True))
    torch.testing.assert_close(fusion(taps), expected)


def test_grouped_fuses_each_contiguous_group_on_its_own() -> None:
    """Groups [H_0, H_1], [H_2]: a projection that reads only one group's block sees only that group."""
    taps = random_taps(3)
    fusion = Grouped([2, 1], DIM, DIM)
    identity, zero = torch.eye(DIM), torch.zeros(DIM, DIM)
    with torch.no_grad():
        fusion.projection.bias.zero_()
        fusion.projection.weight.copy_(torch.cat([identity, zero], dim=1))
        low = fusion(taps)
        fusion.projection.weight.copy_(torch.cat([zero, identity], dim=1))
        high = fusion(taps)
    normalised = [F.layer_norm(tap, (DIM,)) for tap in taps]
    torch.testing.assert_close(low, (normalised[0] + normalised[1]) / 2)
    torch.testing.assert_close(high, normalised[2])


def test_grouped_from_a_config_takes_the_resolved_groups() -> None:
    fusion = head("grouped", groups=[[0, 2], [3, 5, 6]])
    assert fusion.group_sizes == [2, 3]
    assert head("grouped", groups=3).group_sizes == [2, 2, 1]


def test_ladder_follows_its_recursion() -> None:
    taps = random_taps(3)
    fusion = Ladder(3, DIM, 10, reduction=4, attention_heads=2, dropout=0.0).eval()
    with torch.no_grad():
        fusion.alphas.copy_(torch.tensor([0.05, -0.2]))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mu = torch.sigmoid(torch.tensor([0.05, -0.2]) / 0.1)
    down = [fusion.downs[k](F.layer_norm(taps[k], (DIM,))) for k in range(3)]
    s = down[0]
    for k in range(2):
        s = fusion.blocks[k](mu[k] * s + (1 - mu[k]) * down[k + 1], mask)
    torch.testing.assert_close(fusion(taps, mask), fusion.up(fusion.final_norm(s)))


def test_ladder_gates_start_at_one_half() -> None:
    assert torch.equal(Ladder(4, DIM, DIM, reduction=4).gates(), torch.full((3,), 0.5))


def test_ladder_valid_frames_ignore_padded_frames() -> None:
    """Utterance 1 has 4 valid frames: its output there is the same with any padding and alone."""
    fusion = head("ladder")
    taps = random_taps(frames=7)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    z = fusion(taps, mask)
    noisy = [tap.clone() for tap in taps]
    for tap in noisy:
        tap[1, 4:] = 100 * torch.randn(3, DIM)
    alone = fusion([tap[1:, :4] for tap in taps], torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(fusion(noisy, mask)[1, :4], z[1, :4])
    torch.testing.assert_close(alone[0], z[1, :4])
    assert not torch.allclose(fusion(noisy, None)[1, :4], z[1, :4])


@pytest.mark.parametrize("variant", ["weighted_sum", "grouped", "layer_conv"])
def test_framewise_heads_mix_no_frames(variant: str) -> None:
    fusion = head(variant)
    taps = random_taps()
    changed = [tap.clone() for tap in taps]
    for tap in changed:
        tap[:, 3] += 5.0
    difference = (fusion(changed) - fusion(taps)).abs().amax(dim=-1)
    assert torch.all(difference[:, 3] > 0)
    assert torch.all(difference[:, [0, 1, 2, 4, 5, 6]] == 0)


@pytest.mark.parametrize("kernel_size", [2, 3])
@pytest.mark.parametrize("num_taps", [1, 2, 3, 5, 8])
def test_layer_conv_halves_the_layer_axis_down_to_one(kernel_size: int, num_taps: int) -> None:
    fusion = LayerConv(num_taps, DIM, 12, kernel_size=kernel_size)
    assert len(fusion.convs) == {1: 0, 2: 1, 3: 2, 5: 3, 8: 3}[num_taps]
    assert fusion(random_taps(num_taps)).shape == (2, 7, 12)


def test_layer_conv_of_one_tap_projects_its_layer_norm() -> None:
    (tap,) = random_taps(1)
    fusion = LayerConv(1, DIM, 12)
    torch.testing.assert_close(fusion([tap]), fusion.projection(F.layer_norm(tap, (DIM,))))


@pytest.mark.parametrize("variant", VARIANTS)
def test_taps_of_different_lengths_are_refused(variant: str) -> None:
    taps = random_taps()
    taps[2] = torch.randn(2, 4, DIM)
    with pytest.raises(PeftConfigError, match=r"tap 0 is \(2, 7, 16\) but tap 2 is \(2, 4, 16\).*frame rate"):
        head(variant)(taps)


def test_a_wrong_number_of_taps_is_refused() -> None:
    with pytest.raises(PeftConfigError, match="built for 5 taps but got 3"):
        head("weighted_sum")(random_taps(3))


def test_a_ladder_width_that_attention_heads_do_not_divide_is_refused() -> None:
    with pytest.raises(PeftConfigError, match=r"16 // 4 = 4 .* attention_heads = 3"):
        head("ladder", attention_heads=3)


def test_layer_conv_kernel_must_be_two_or_three() -> None:
    with pytest.raises(PeftConfigError, match="kernel_size must be 2 or 3"):
        LayerConv(3, DIM, DIM, kernel_size=4)
