"""Every method works on the ESPnet encoder and decoder families the papers' models use, with
the target names ESPnet users write: identity at init, and an exact merge of a trained adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder
from espnet2.asr.encoder.e_branchformer_encoder import EBranchformerEncoder
from espnet2.asr.encoder.transformer_encoder import TransformerEncoder
from torch import nn

from ssvd_peft.inject import inject_adapters, merge_and_unload

METHODS = {
    "lora": {"rank": 4, "alpha": 4},
    "dora": {"rank": 4, "alpha": 4},
    "pissa": {"rank": 4, "alpha": 4},
    "ssvd": {"k_ratio": 0.4},
    "ssvd_o": {"k_ratio": 0.4, "outer_share": 0.3},
}
ATTENTION_AND_FFN = ["linear_q", "linear_k", "linear_v", "linear_out", "w_1", "w_2"]
E_BRANCHFORMER = [*ATTENTION_AND_FFN, "channel_proj1.0", "channel_proj2", "merge_proj"]


class EncoderOutput(nn.Module):
    """An ESPnet encoder as a plain function of features (lengths fixed)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        lengths = torch.full((features.shape[0],), features.shape[1])
        return self.encoder(features, lengths)[0]


class DecoderOutput(nn.Module):
    """An ESPnet Transformer decoder on fixed encoder states and token prefixes."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        self.tokens = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(0))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        lengths = torch.full((states.shape[0],), states.shape[1])
        token_lengths = torch.full((2,), 5)
        return self.decoder(states, lengths, self.tokens, token_lengths)[0]


def e_branchformer() -> tuple[nn.Module, list[str], int]:
    encoder = EBranchformerEncoder(
        input_size=20,
        output_size=32,
        attention_heads=4,
        linear_units=64,
        cgmlp_linear_units=64,
        num_blocks=2,
        input_layer="conv2d",
        use_ffn=True,
        macaron_ffn=True,
    )
    return EncoderOutput(encoder), E_BRANCHFORMER, 20


def conformer() -> tuple[nn.Module, list[str], int]:
    encoder = ConformerEncoder(
        input_size=20,
        output_size=32,
        attention_heads=4,
        linear_units=64,
        num_blocks=2,
        macaron_style=True,
        use_cnn_module=True,
        rel_pos_type="latest",
        pos_enc_layer_type="rel_pos",
        selfattention_layer_type="rel_selfattn",
    )
    return EncoderOutput(encoder), ATTENTION_AND_FFN, 20


def transformer_encoder() -> tuple[nn.Module, list[str], int]:
    encoder = TransformerEncoder(
        input_size=20, output_size=32, attention_heads=4, linear_units=64, num_blocks=2
    )
    return EncoderOutput(encoder), ATTENTION_AND_FFN, 20


def transformer_decoder() -> tuple[nn.Module, list[str], int]:
    decoder = TransformerDecoder(
        vocab_size=10, encoder_output_size=32, attention_heads=4, linear_units=64, num_blocks=2
    )
    return DecoderOutput(decoder), ATTENTION_AND_FFN, 32


FAMILIES = {
    "e_branchformer": e_branchformer,
    "conformer": conformer,
    "transformer_encoder": transformer_encoder,
    "transformer_decoder": transformer_decoder,
}


def build(family: str) -> tuple[nn.Module, list[str], torch.Tensor]:
    torch.manual_seed(0)
    model, targets, input_size = FAMILIES[family]()
    features = torch.randn(2, 24, input_size, generator=torch.Generator().manual_seed(1))
    return model.eval(), targets, features


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init_on_every_target(family: str, method: str) -> None:
    model, targets, features = build(family)
    with torch.no_grad():
        expected = model(features)
    report = inject_adapters(model, method, target_modules=targets, **METHODS[method])
    suffixes = {name.split(".")[-1] for name in (m.name for m in report.modules)}
    assert {target.split(".")[-1] for target in targets} <= suffixes | {"0"}
    with torch.no_grad():
        torch.testing.assert_close(model(features), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_trained_adapter_merges_exactly(family: str, method: str) -> None:
    model, targets, features = build(family)
    inject_adapters(model, method, target_modules=targets, init_weights=False, **METHODS[method])
    with torch.no_grad():
        adapted = model(features)
        merged = merge_and_unload(copy.deepcopy(model))(features)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_e_branchformer_channel_proj_names_the_linear_inside() -> None:
    model, _, _ = build("e_branchformer")
    with pytest.raises(
        ValueError, match=r"Linear layers inside: encoder\.encoders\.0\.cgmlp\.channel_proj1\.0"
    ):
        inject_adapters(model, "lora", target_modules=["channel_proj1"])
