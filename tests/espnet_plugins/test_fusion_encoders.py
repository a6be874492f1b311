"""``FusedEncoder`` on ESPnet's Conformer, E-Branchformer and Transformer encoders: the taps are the
encoder's own hidden states, gradients reach only the head (and adapters), blocks above the deepest
tap never run, and bad set-ups get one message each."""

from __future__ import annotations

import argparse

import pytest
import torch
from espnet2.asr.encoder.rnn_encoder import RNNEncoder
from test_encoder_families import conformer, e_branchformer, transformer_encoder
from torch import nn

from espnet_plugins.fusion import FusedEncoder, attach_fusion, fusion_options
from ssvd_peft.errors import PeftConfigError
from ssvd_peft.fusion import FusionConfig
from ssvd_peft.inject import inject_adapters, mark_only_adapters_trainable

ENCODERS = {"conformer": conformer, "e_branchformer": e_branchformer, "transformer": transformer_encoder}
LENGTHS = torch.tensor([24, 17])


def encoder(family: str) -> nn.Module:
    torch.manual_seed(0)
    wrapped, _, _ = ENCODERS[family]()
    return wrapped.encoder.eval()


def features() -> torch.Tensor:
    return torch.randn(2, 24, 20, generator=torch.Generator().manual_seed(1))


def frozen(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


@pytest.mark.parametrize("family", ENCODERS)
def test_taps_are_the_encoders_hidden_states(family: str) -> None:
    """One tap at the last block, zero weights: the LayerNorm of the encoder's last block output
    (ESPnet's return_all_hs gives every block's output)."""
    base = encoder(family)
    with torch.no_grad():
        _, _, _ = base(features(), LENGTHS)
        (_, hidden), lengths, _ = base(features(), LENGTHS, return_all_hs=True)
    last = len(base.encoders)
    fused = FusedEncoder(frozen(base), FusionConfig(taps=[last], variant="weighted_sum"))
    with torch.no_grad():
        out, out_lengths, _ = fused(features(), LENGTHS)
    assert torch.equal(out_lengths, lengths)
    expected = nn.functional.layer_norm(hidden[-1], hidden[-1].shape[-1:])
    for row, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[row, :length], expected[row, :length], rtol=1e-5, atol=1e-5)
    assert fused.output_size() == base.output_size()


@pytest.mark.parametrize("family", ENCODERS)
def test_a_residual_fusion_is_the_pretrained_encoder_until_its_gate_moves(family: str) -> None:
    base = encoder(family)
    with torch.no_grad():
        expected, lengths, _ = base(features(), LENGTHS)
    fused = FusedEncoder(frozen(base), FusionConfig(taps="all", variant="grouped", groups=2, residual=True))
    fused.train()
    out, out_lengths, _ = fused(features(), LENGTHS)
    assert torch.equal(out_lengths, lengths)
    for row, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(out[row, :length], expected[row, :length], rtol=1e-6, atol=1e-6)
    out[0, : int(lengths[0])].sum().backward()
    assert fused.residual.gate.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())


@pytest.mark.parametrize("variant", ["weighted_sum", "grouped", "ladder", "layer_conv"])
@pytest.mark.parametrize("family", ENCODERS)
def test_only_the_head_learns_and_no_block_above_the_deepest_tap_runs(family: str, variant: str) -> None:
    base = frozen(encoder(family))
    calls: list[int] = []
    for index, block in enumerate(base.encoders):
        block.register_forward_hook(lambda *_, index=index: calls.append(index))
    fused = FusedEncoder(base, FusionConfig(taps=[0, 1], variant=variant, groups=2, reduction=4)).train()
    out, lengths, _ = fused(features(), LENGTHS)
    out[0, : int(lengths[0])].sum().backward()
    assert calls == [0]  # block 2 of 2 is above the deepest tap
    assert all(p.grad is None for p in base.parameters())
    assert all(p.grad is not None for p in fused.head.parameters())


def test_adapters_in_the_blocks_learn_through_the_fusion() -> None:
    base = encoder("conformer")
    inject_adapters(base, "lora", target_modules=["linear_q", "linear_v"], rank=2, init_weights=False)
    mark_only_adapters_trainable(base)
    fused = FusedEncoder(base, FusionConfig(taps="all", variant="grouped", groups=2))
    out, _, _ = fused(features(), LENGTHS)
    out.sum().backward()
    named = dict(base.named_parameters())
    adapters = [p for n, p in named.items() if p.requires_grad]
    assert adapters and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)
    assert all(p.grad is None for n, p in named.items() if not p.requires_grad)


def test_a_tap_out_of_range_names_the_range() -> None:
    with pytest.raises(PeftConfigError, match=r"tap 3 is out of range.*2 blocks"):
        FusedEncoder(frozen(encoder("transformer")), FusionConfig(taps=[0, 3]))


def test_an_encoder_without_blocks_is_refused_with_the_families_that_work() -> None:
    rnn = RNNEncoder(input_size=20, num_layers=1, hidden_size=16, output_size=16)
    with pytest.raises(PeftConfigError, match="Conformer, E-Branchformer and Transformer"):
        FusedEncoder(rnn, FusionConfig())


class TinyModel(nn.Module):
    def __init__(self, specaug: nn.Module | None) -> None:
        super().__init__()
        self.encoder = frozen(encoder("transformer"))
        self.specaug = specaug


def test_the_tap_cache_is_refused_with_specaugment(tmp_path) -> None:
    args = argparse.Namespace(fusion={"cache_dir": str(tmp_path / "taps"), "cache_max_gb": 0.1})
    with pytest.raises(PeftConfigError, match="specaug: null"):
        attach_fusion(TinyModel(specaug=nn.Identity()), fusion_options(args), training=True)
    attach_fusion(TinyModel(specaug=None), fusion_options(args), training=True)
    assert (tmp_path / "taps").is_dir()


def test_the_fusion_block_is_read_with_its_espnet_keys() -> None:
    options = fusion_options(argparse.Namespace(fusion={"variant": "ladder", "taps": [0, 2]}))
    assert options.train_modules == ["decoder", "ctc"]
    assert options.trained_modules() == ["encoder.head", "decoder", "ctc"]
    assert fusion_options(argparse.Namespace(fusion={})) is None
    with pytest.raises(PeftConfigError, match="train_modules must be a list"):
        fusion_options(argparse.Namespace(fusion={"train_modules": "decoder"}))
    with pytest.raises(PeftConfigError, match="Did you mean 'taps'"):
        fusion_options(argparse.Namespace(fusion={"tapz": [1]}))
