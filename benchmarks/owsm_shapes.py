"""OWSM-shaped ESPnet speech-to-text models for the benchmarks: the architecture of a public OWSM
checkpoint (``espnet2.tasks.s2t``) with random weights, as ``S2TTask.build_model`` takes its config.

``OWSM_V31_BASE`` is OWSM v3.1 base (101M): E-Branchformer encoder, 6 blocks of 384 with 1536
units; Transformer decoder, 6 blocks; 50002 tokens. ``QUICK`` is the same architecture at toy size
(smoke tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

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


def build_config(work: Path, quick: bool) -> dict[str, Any]:
    """The S2T training config of the benchmark model (tokens and global-MVN statistics written to
    ``work``), as ESPnet's ``S2TTask.build_model`` takes it."""
    base = QUICK if quick else OWSM_V31_BASE
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
