"""Feature fusion through the plugin's entry points, on the tiny base model of the tone corpus:
``espnet_plugins.bin.asr_train`` with a fusion block (alone, and beside a LoRA peft block), model
files holding what was trained, the tap cache reproducing the uncached model, and decoding with
``espnet_plugins.bin.asr_inference``."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from espnet_runs import REPO, data_args, decode, read_text_file, run_module

pytest.importorskip("espnet2")

EPOCHS = 4
TRAINING = yaml.safe_load((REPO / "conf" / "tiny" / "finetune_ssvd_o.yaml").read_text())
TRAINING = {key: value for key, value in TRAINING.items() if not key.startswith("peft")}
TRAINED_PREFIXES = ("encoder.head.", "decoder.", "ctc.")


def train(work: Path, base: Path, name: str, block: dict, *extra: str) -> tuple[Path, str]:
    """Train with the plugin's entry point from the training options plus ``block``."""
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump({**TRAINING, **block, "peft_pretrained": str(base)}))
    exp = work / "exp" / name
    args = ["--config", str(config), "--output_dir", str(exp), "--max_epoch", str(EPOCHS), *extra]
    args += data_args("train", work / "data" / "adapt") + data_args("valid", work / "data" / "test")
    return exp, run_module("espnet_plugins.bin.asr_train", args, work, work / f"{name}.log")


@pytest.fixture(scope="module")
def fusion_only(tone_corpus: Path, tone_base: Path) -> tuple[Path, str]:
    block = {"fusion": {"variant": "grouped", "taps": "all", "groups": 2}}
    return train(tone_corpus, tone_base, "fusion_grouped", block)


@pytest.fixture(scope="module")
def fusion_lora(tone_corpus: Path, tone_base: Path) -> tuple[Path, str]:
    block = {
        "fusion": {"variant": "weighted_sum", "taps": [1, 2]},
        "peft": "lora",
        "peft_conf": {"target_modules": ["linear_q", "linear_v", "w_1", "w_2"], "rank": 4},
    }
    return train(tone_corpus, tone_base, "fusion_lora", block)


def losses(log: str) -> list[float]:
    parts = re.findall(r"\d+epoch results: \[train\](.*?)\[valid\]", log)
    return [float(re.search(r"[ ,]loss=([0-9.e+-]+)", part).group(1)) for part in parts]


def character_errors(hypotheses: dict[str, str], references: dict[str, str]) -> float:
    import editdistance

    errors = sum(editdistance.eval(hypotheses.get(utt, ""), text) for utt, text in references.items())
    return errors / sum(len(text) for text in references.values())


@pytest.mark.parametrize("run", ["fusion_only", "fusion_lora"])
def test_fusion_training_lowers_the_loss(run: str, request: pytest.FixtureRequest) -> None:
    _, log = request.getfixturevalue(run)
    values = losses(log)
    assert len(values) == EPOCHS and values[-1] < 0.9 * values[0], values
    assert "Feature fusion (" in log


def test_model_files_hold_the_head_and_the_trained_modules_only(
    fusion_only: tuple[Path, str], tone_base: Path
) -> None:
    exp, _ = fusion_only
    state = torch.load(exp / "valid.acc.best.pth", map_location="cpu")
    base = torch.load(tone_base, map_location="cpu")
    assert any(key.startswith("encoder.head.") for key in state)
    assert all(key.startswith(TRAINED_PREFIXES) for key in state), sorted(state)[:5]
    assert {key for key in base if key.startswith(("decoder.", "ctc."))} == {
        key for key in state if key.startswith(("decoder.", "ctc."))
    }
    assert not torch.equal(state["ctc.ctc_lo.weight"], base["ctc.ctc_lo.weight"])
    counts = json.loads((exp / "fusion_budget.json").read_text())
    assert counts["trainable"] == sum(value.numel() for value in state.values())
    assert counts["head"] == sum(v.numel() for k, v in state.items() if k.startswith("encoder.head."))
    assert counts["encoder_trainable"] == 0 and not (exp / "peft_budget.json").exists()


def test_fusion_with_adapters_saves_and_trains_the_adapters_too(fusion_lora: tuple[Path, str]) -> None:
    exp, _ = fusion_lora
    state = torch.load(exp / "valid.acc.best.pth", map_location="cpu")
    lora_b = [value for key, value in state.items() if key.endswith("lora_B")]
    # q, v, w_1, w_2 of both encoder blocks, and q, v (self and source attention), w_1, w_2 of the decoder
    assert len(lora_b) == 14 and all(value.abs().sum() > 0 for value in lora_b)
    others = {key for key in state if ".peft_adapters." not in key and not key.endswith("base_fingerprint")}
    assert all(key.startswith(TRAINED_PREFIXES) for key in others)
    counts = json.loads((exp / "fusion_budget.json").read_text())
    encoder_lora = [v for k, v in state.items() if k.startswith("encoder.taps.") and ".peft_adapters." in k]
    assert counts["encoder_trainable"] == sum(value.numel() for value in encoder_lora) > 0
    assert counts["trainable"] == json.loads((exp / "peft_budget.json").read_text())["trainable"]


def test_fused_models_decode_better_than_the_base_on_the_new_domain(
    tone_corpus: Path, tone_base: Path, fusion_only: tuple[Path, str], fusion_lora: tuple[Path, str]
) -> None:
    test = tone_corpus / "data" / "test"
    references = read_text_file(test / "text")
    base = decode(
        tone_corpus, "espnet2.bin.asr_inference", tone_base.parent / "config.yaml", tone_base, "f_base", test
    )
    base_error = character_errors(base, references)
    for (exp, _), name in ((fusion_only, "f_only"), (fusion_lora, "f_lora")):
        hypotheses = decode(
            tone_corpus,
            "espnet_plugins.bin.asr_inference",
            exp / "config.yaml",
            exp / "valid.acc.best.pth",
            name,
            test,
        )
        assert hypotheses.keys() == references.keys()
        assert character_errors(hypotheses, references) < base_error, name
    exp, _ = fusion_lora
    merged = decode(
        tone_corpus,
        "espnet_plugins.bin.asr_inference",
        exp / "config.yaml",
        exp / "valid.acc.best.pth",
        "f_lora_merged",
        test,
        "--peft_merge",
        "true",
    )
    assert merged == read_text_file(tone_corpus / "decode" / "f_lora" / "1best_recog" / "text")


def test_the_tap_cache_gives_the_model_trained_without_it(
    tone_corpus: Path, tone_base: Path, fusion_only: tuple[Path, str]
) -> None:
    cache = tone_corpus / "taps"
    block = {
        "fusion": {
            "variant": "grouped",
            "taps": "all",
            "groups": 2,
            "cache_dir": str(cache),
            "cache_max_gb": 1,
        }
    }
    exp, _ = train(tone_corpus, tone_base, "fusion_cached", block)
    assert len(list(cache.glob("*.safetensors"))) == 32 + 8  # adapt and valid utterances
    cached = torch.load(exp / "valid.acc.best.pth", map_location="cpu")
    uncached = torch.load(fusion_only[0] / "valid.acc.best.pth", map_location="cpu")
    assert cached.keys() == uncached.keys()
    # batch_type unsorted: the same batches every epoch, so the cached taps are the computed ones
    assert all(torch.equal(cached[key], value) for key, value in uncached.items())


def test_a_plain_model_export_of_a_fused_model_is_refused(
    tone_corpus: Path, fusion_only: tuple[Path, str]
) -> None:
    exp, _ = fusion_only
    args = [
        "--asr_train_config",
        str(exp / "config.yaml"),
        "--asr_model_file",
        str(exp / "valid.acc.best.pth"),
    ]
    log = run_module(
        "espnet_plugins.bin.export_merged",
        [*args, "--output_dir", "export_fused"],
        tone_corpus,
        tone_corpus / "export_fused.log",
        expect_failure=True,
    )
    assert "feature-fusion model" in log and not (tone_corpus / "export_fused").exists()


@pytest.fixture(scope="module")
def fusion_layers():
    common = REPO / "egs" / "common" / "pyscripts"
    if str(common) not in sys.path:
        sys.path.insert(0, str(common))
    import fusion_layers

    return fusion_layers


def test_the_layer_analysis_trains_a_head_per_tap_and_scores_each(
    tone_corpus: Path, tone_base: Path, fusion_layers
) -> None:
    config = tone_corpus / "layers.yaml"
    config.write_text(yaml.safe_dump({**TRAINING, "fusion": {"variant": "weighted_sum"}}))
    output = tone_corpus / "exp" / "layers"
    train = ["--peft_pretrained", str(tone_base), "--max_epoch", "1"]
    train += data_args("train", tone_corpus / "data" / "adapt") + data_args(
        "valid", tone_corpus / "data" / "test"
    )
    decoding = tone_corpus / "layers_decode.yaml"
    decoding.write_text(yaml.safe_dump({"batch_size": 1, "beam_size": 2, "ctc_weight": 0.5, "ngpu": 0}))
    argv = ["--config", str(config), "--layers", "all", "--output_dir", str(output)]
    argv += ["--decode_config", str(decoding)]
    fusion_layers.main([*argv, "--test", f"shifted={tone_corpus / 'data' / 'test'}", "--", *train])
    with (output / "layers.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["layer"] for row in rows] == ["0", "1", "2"]  # the embedding output and both blocks
    assert all(0 <= float(row["CER"]) <= 100 and row["words"] == rows[0]["words"] for row in rows)
    for layer in (0, 1, 2):
        trained = yaml.safe_load((output / f"layer{layer}" / "config.yaml").read_text())["fusion"]
        assert trained["taps"] == [layer] and trained["variant"] == "weighted_sum"
    assert (output / "layers.png").read_bytes()[:4] == b"\x89PNG"


def test_the_layer_analysis_asks_for_layers_it_cannot_count(tmp_path: Path, fusion_layers) -> None:
    config = tmp_path / "layers.yaml"
    config.write_text(yaml.safe_dump({"fusion": {"variant": "weighted_sum"}}))
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "text").write_text("u1 a\n")
    argv = [
        "--config",
        str(config),
        "--output_dir",
        str(tmp_path / "out"),
        "--test",
        f"dev={tmp_path / 'dev'}",
    ]
    with pytest.raises(SystemExit, match="list the layers instead"):
        fusion_layers.main(argv)
    assert not (tmp_path / "out").exists()
