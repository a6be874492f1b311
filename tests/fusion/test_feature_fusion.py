"""FeatureFusion: gradients reach the head (and adapters) only, the head saves and loads, the
trainable parameters are the head's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from toy_encoder import DIM, toy_batch, toy_encoder, toy_fusion

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.fusion import FeatureFusion, FusionConfig, TapCache, TappedEncoder, WeightedSum

VARIANTS = ["weighted_sum", "grouped", "ladder", "layer_conv"]


def frozen_parameters(fusion: FeatureFusion) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in fusion.encoder.named_parameters() if not name.endswith("delta")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_the_head_and_never_the_frozen_encoder(variant: str) -> None:
    fusion = toy_fusion(variant, taps=[0, 1, 2, 3], out_dim=12).train()
    z, out_lengths = fusion(*toy_batch([10, 7, 9]))
    assert z.shape == (3, 5, 12)
    assert out_lengths.tolist() == [5, 3, 4]
    z.square().sum().backward()
    assert all(p.grad is None for _, p in frozen_parameters(fusion))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.head.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_flow_through_the_encoder_to_an_adapter_in_a_block(variant: str) -> None:
    fusion = toy_fusion(variant, adapted_block=2).train()
    z, _ = fusion(*toy_batch([10, 7, 9]))
    z.square().sum().backward()
    adapter = fusion.encoder.blocks[1].delta
    assert adapter.grad is not None and adapter.grad.abs().sum() > 0
    assert all(p.grad is None for _, p in frozen_parameters(fusion))
    assert any(p is adapter for p in fusion.trainable_parameters())


def test_the_trainable_parameters_are_the_heads() -> None:
    fusion = toy_fusion("ladder")
    assert {id(p) for p in fusion.trainable_parameters()} == {id(p) for p in fusion.head.parameters()}
    counts = fusion.parameter_counts()
    assert counts["head"] == sum(p.numel() for p in fusion.head.parameters())
    assert counts["encoder_trainable"] == 0
    assert counts["encoder_frozen"] == sum(p.numel() for p in fusion.encoder.parameters())
    assert toy_fusion("ladder", adapted_block=2).parameter_counts()["encoder_trainable"] == DIM


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_saved_head_loads_into_a_new_instance_with_identical_outputs(variant: str, tmp_path: Path) -> None:
    fusion = toy_fusion(variant, seed=0).eval()
    with torch.no_grad():
        for parameter in fusion.head.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    torch.save(fusion.head.state_dict(), tmp_path / "head.pt")
    restored = toy_fusion(variant, seed=0).eval()
    batch = toy_batch([10, 7, 9])
    assert not torch.equal(restored(*batch)[0], fusion(*batch)[0])
    restored.head.load_state_dict(torch.load(tmp_path / "head.pt", weights_only=True))
    assert torch.equal(restored(*batch)[0], fusion(*batch)[0])


def test_from_config_opens_the_tap_cache_of_the_config(tmp_path: Path) -> None:
    embed, blocks = toy_encoder()
    config = FusionConfig(taps=[0, 2], cache_dir=str(tmp_path / "taps"), cache_max_gb=0.001)
    fusion = FeatureFusion.from_config(config, embed=embed, blocks=blocks, dim=DIM)
    assert isinstance(fusion.encoder.cache, TapCache)
    assert fusion.encoder.cache.max_bytes == config.cache_max_bytes
    fusion(*toy_batch([10, 7]))
    assert len(list((tmp_path / "taps").iterdir())) == 2


def test_a_head_over_another_number_of_taps_is_refused() -> None:
    embed, blocks = toy_encoder()
    with pytest.raises(PeftConfigError, match=r"head fuses 2 taps but the encoder yields 3 \(\[0, 1, 3\]\)"):
        FeatureFusion(TappedEncoder(embed, blocks, [0, 1, 3]), WeightedSum(2, DIM, DIM))


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_residual_fusion_starts_as_the_encoders_output_and_then_learns(variant: str) -> None:
    torch.manual_seed(0)
    embed, blocks = toy_encoder()
    final_norm = torch.nn.LayerNorm(DIM)
    torch.nn.init.normal_(final_norm.weight)
    config = FusionConfig(variant=variant, taps=[0, 2, 4], reduction=4, groups=2, residual=True)
    fusion = FeatureFusion.from_config(config, embed=embed, blocks=blocks, dim=DIM, final_norm=final_norm)
    fusion.train()
    x, lengths = toy_batch([10, 7, 9])
    z, _ = fusion(x, lengths)
    with torch.no_grad():
        taps, _, _ = fusion.encoder(x, lengths)
    assert torch.equal(z, final_norm(taps[-1]))  # the gate is zero: exactly N(H_L)
    z.square().sum().backward()
    assert fusion.residual.gate.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in fusion.head.parameters())
    assert final_norm.weight.grad is None and not final_norm.weight.requires_grad
    optimizer = torch.optim.Adam(fusion.trainable_parameters(), lr=0.1)
    optimizer.step()
    assert not torch.equal(fusion(x, lengths)[0], z)
    assert fusion.parameter_counts()["head"] == sum(p.numel() for p in fusion.head.parameters()) + DIM


def test_a_residual_fusion_needs_the_last_block_and_the_encoders_width() -> None:
    with pytest.raises(PeftConfigError, match=r"add 4 to the taps or set residual: false"):
        toy_fusion(taps=[0, 1, 3], residual=True)
    with pytest.raises(PeftConfigError, match=r"drop out_dim or set residual: false"):
        toy_fusion(taps=[0, 4], out_dim=8, residual=True)
    with pytest.raises(PeftConfigError, match=r"residual must be true or false"):
        FusionConfig(residual="yes")
