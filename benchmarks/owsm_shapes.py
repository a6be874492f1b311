"""OWSM-shaped ESPnet speech-to-text models for the benchmarks: the architecture of a public OWSM
checkpoint (``espnet2.tasks.s2t``) with random weights, as ``S2TTask.build_model`` takes its config.

``OWSM_V31_BASE`` is OWSM v3.1 base (101M, ``espnet/owsm_v3.1_ebf_base``): E-Branchformer encoder,
6 blocks of 384 with 1536 units; Transformer decoder, 6 blocks; 50002 tokens. ``OWSM_V31_SMALL``
(367M, ``espnet/owsm_v3.1_ebf_small``): 9 + 9 blocks of 768, 3072 units, 12 heads.
``OWSM_V31_MEDIUM`` (1.02B, ``espnet/owsm_v3.1_ebf``): 18 + 18 blocks of 1024, 4096 units, 16 heads.
``QUICK`` is the same architecture at toy size (smoke tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

TOKENS = 50002
OWSM_V31_BASE = {
    "frontend_conf": {"fs": 16000, "n_fft": 512, "win_length": 400, "hop_length": 160, "n_mels": 80},
    "normalize": "global_mvn",
    "encoder": "e_branchformer",
    "encoder_conf": {
        "output_size": 384, "attention_heads": 6, "attention_layer_type": "selfattn",
        "pos_enc_layer_type": "abs_pos", "rel_pos_type": "latest", "cgmlp_linear_units": 1536,
        "cgmlp_conv_kernel": 31, "use_linear_after_conv": False, "gate_activation": "identity",
        "num_blocks": 6, "input_layer": "conv2d", "linear_units": 1536, "positionwise_layer_type": "linear",
        "use_ffn": True, "macaron_ffn": True, "merge_conv_kernel": 31,
    },
    "decoder": "transformer",
    "decoder_conf": {"attention_heads": 6, "linear_units": 1536, "num_blocks": 6},
    "model_conf": {"ctc_weight": 0.3, "lsm_weight": 0.1, "length_normalized_loss": False, "sym_na": "<na>"},
}  # fmt: skip


def scaled(size: int, heads: int, units: int, blocks: int) -> dict[str, Any]:
    """OWSM v3.1's architecture with another width, head count, feed-forward size and depth."""
    return {
        **OWSM_V31_BASE,
        "encoder_conf": {
            **OWSM_V31_BASE["encoder_conf"], "output_size": size, "attention_heads": heads,
            "cgmlp_linear_units": units, "linear_units": units, "num_blocks": blocks,
        },
        "decoder_conf": {"attention_heads": heads, "linear_units": units, "num_blocks": blocks},
    }  # fmt: skip


OWSM_V31_SMALL = scaled(768, 12, 3072, 9)
OWSM_V31_MEDIUM = scaled(1024, 16, 4096, 18)
QUICK = {
    **OWSM_V31_BASE,
    "encoder_conf": {
        **OWSM_V31_BASE["encoder_conf"], "output_size": 32, "attention_heads": 2,
        "cgmlp_linear_units": 64, "linear_units": 64, "num_blocks": 2, "cgmlp_conv_kernel": 3,
        "merge_conv_kernel": 3,
    },
    "decoder_conf": {"attention_heads": 2, "linear_units": 64, "num_blocks": 2},
}  # fmt: skip
QUICK_TOKENS = 500
SHAPES = {"quick": QUICK, "0.1b": OWSM_V31_BASE, "0.37b": OWSM_V31_SMALL, "1b": OWSM_V31_MEDIUM}


def build_config(work: Path, shape: str) -> dict[str, Any]:
    """The S2T training config of the ``shape`` model (a key of ``SHAPES``; tokens and global-MVN
    statistics written to ``work``), as ESPnet's ``S2TTask.build_model`` takes it."""
    base = SHAPES[shape]
    quick = shape == "quick"
    tokens = [
        "<blank>",
        "<unk>",
        "<na>",
        "<nolang>",
        "<eng>",
        "<asr>",
        "<notimestamps>",
        "<sop>",
        "<sos>",
        "<eos>",
    ]
    tokens[-2:-2] = [f"tok{i}" for i in range((QUICK_TOKENS if quick else TOKENS) - len(tokens))]
    n_mels = base["frontend_conf"]["n_mels"]
    stats = work / "feats_stats.npz"
    np.savez(stats, count=np.array(1000), sum=np.zeros(n_mels), sum_square=np.full(n_mels, 1000.0))
    return {
        **base,
        "token_list": tokens,
        "token_type": "bpe",
        "input_size": None,
        "frontend": "default",
        "specaug": None,
        "preencoder": None,
        "postencoder": None,
        "normalize_conf": {"stats_file": str(stats)},
        "init": None,
        "ctc_conf": {},
    }


def s2t_batch(
    token_list: list[str], utterances: int, seconds: float, words: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A training batch of ``S2TTask``'s model: ``utterances`` of ``seconds`` of noise, each with
    ``words`` random tokens after OWSM's task prefix (<eng><asr><notimestamps>) and no prompt."""
    tokens = {token: index for index, token in enumerate(token_list)}
    prefix = [tokens["<eng>"], tokens["<asr>"], tokens["<notimestamps>"]]
    body = torch.randint(10, len(tokens) - 2, (utterances, words), generator=generator)
    text = torch.cat([torch.tensor([prefix] * utterances), body], dim=1)
    samples = int(seconds * 16000)
    return {
        "speech": 0.1 * torch.randn(utterances, samples, generator=generator),
        "speech_lengths": torch.full((utterances,), samples),
        "text": text,
        "text_lengths": torch.full((utterances,), text.shape[1]),
        "text_prev": torch.full((utterances, 1), tokens["<na>"]),
        "text_prev_lengths": torch.ones(utterances, dtype=torch.long),
        "text_ctc": body,
        "text_ctc_lengths": torch.full((utterances,), words),
    }
