"""The pretrained base model: architecture options from its config, weights loaded strictly."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml

from espnet_plugins.options import PeftOptions, without_peft_options
from espnet_plugins.pretrained import PretrainedModelError, adopt_pretrained_architecture, load_full_state

KEYS = ["encoder", "encoder_conf", "token_list"]
DEFAULTS = {"encoder": "rnn", "encoder_conf": {}, "token_list": None}


@pytest.fixture
def pretrained_dir(tmp_path: Path) -> Path:
    config = {"encoder": "conformer", "encoder_conf": {"output_size": 64}, "token_list": ["<blank>", "a"]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**config, "optim": "sgd"}))
    return tmp_path


def options(pretrained_dir: Path, **changes) -> PeftOptions:
    return PeftOptions(method="lora", conf={}, pretrained=str(pretrained_dir / "model.pth"), **changes)


def test_options_left_at_their_defaults_come_from_the_config_next_to_the_model(pretrained_dir) -> None:
    args = argparse.Namespace(encoder="rnn", encoder_conf={}, token_list=None, optim="adam")
    adopt_pretrained_architecture(args, options(pretrained_dir), KEYS, DEFAULTS)
    assert args.encoder == "conformer"
    assert args.encoder_conf == {"output_size": 64}
    assert args.token_list == ["<blank>", "a"]
    assert args.optim == "adam"


def test_options_set_in_the_finetuning_config_win(pretrained_dir, caplog) -> None:
    args = argparse.Namespace(encoder="transformer", encoder_conf={"output_size": 64}, token_list=None)
    adopt_pretrained_architecture(args, options(pretrained_dir), KEYS, DEFAULTS)
    assert args.encoder == "transformer"
    assert "encoder differs from the pretrained model's config" in caplog.text


def test_an_explicit_pretrained_config_that_does_not_exist_is_an_error(pretrained_dir) -> None:
    args = argparse.Namespace(**DEFAULTS)
    missing = options(pretrained_dir, pretrained_config=str(pretrained_dir / "nope.yaml"))
    with pytest.raises(PretrainedModelError, match="does not exist"):
        adopt_pretrained_architecture(args, missing, KEYS, DEFAULTS)


def test_without_a_pretrained_config_nothing_changes(tmp_path) -> None:
    args = argparse.Namespace(**DEFAULTS)
    adopt_pretrained_architecture(args, options(tmp_path), KEYS, DEFAULTS)
    assert vars(args) == DEFAULTS


def test_a_model_file_that_misses_parameters_is_refused(tiny_asr, tmp_path) -> None:
    state = tiny_asr.state_dict()
    del state["decoder.decoders.0.src_attn.linear_q.weight"]
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(
        PretrainedModelError, match=r"missing \['decoder.decoders.0.src_attn.linear_q.weight'\]"
    ):
        load_full_state(tiny_asr, str(tmp_path / "model.pth"))


def test_a_complete_model_file_is_loaded(tiny_asr, tmp_path) -> None:
    state = {key: torch.randn_like(value) for key, value in tiny_asr.state_dict().items()}
    torch.save(state, tmp_path / "model.pth")
    load_full_state(tiny_asr, str(tmp_path / "model.pth"))
    assert torch.equal(tiny_asr.ctc.ctc_lo.weight, state["ctc.ctc_lo.weight"])


def test_the_peft_block_is_removed_for_a_plain_espnet_config() -> None:
    config = {
        "encoder": "conformer",
        "peft": "lora",
        "peft_conf": {},
        "peft_init_param": [],
        "init_param": [],
    }
    assert without_peft_options(config) == {"encoder": "conformer", "init_param": []}
