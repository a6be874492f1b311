"""The ESPnet workflow end to end, through the real entry points.

A tiny Transformer ASR model is pretrained with stock ``espnet2.bin.asr_train`` on a synthetic
tone corpus, then adapted to a pitch-shifted domain with ``espnet_plugins.bin.asr_train`` and
a peft block in the YAML (SSVD-O with adapter-only model files; LoRA with full ones), decoded
with ``espnet_plugins.bin.asr_inference`` (with and without merging), exported with
``espnet_plugins.bin.export_merged`` and decoded again by stock ``espnet2.bin.asr_inference``.
Distributed training of every method is in ``test_round_trip_espnet.py``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from espnet_runs import REPO, data_args, decode, export_merged, read_text_file, run_module
from tiny_corpus import CHARACTERS

pytest.importorskip("espnet2")


ADAPT_EPOCHS = 4
SSVD_O_CONFIG = REPO / "conf" / "tiny" / "finetune_ssvd_o.yaml"
TARGETS = ["linear_q", "linear_v", "w_1", "w_2"]


@pytest.fixture(scope="module")
def work(tone_corpus: Path) -> Path:
    return tone_corpus


@pytest.fixture(scope="module")
def pretrained(tone_base: Path) -> Path:
    return tone_base


def adapt(work: Path, pretrained: Path, name: str, config: Path, *extra: str) -> tuple[Path, str]:
    """Train the adapter with the plugin's entry point; (experiment dir, log text)."""
    exp = work / "exp" / name
    args = ["--config", str(config), "--peft_pretrained", str(pretrained), "--output_dir", str(exp), *extra]
    args += data_args("train", work / "data" / "adapt") + data_args("valid", work / "data" / "test")
    log = run_module("espnet_plugins.bin.asr_train", args, work, work / f"{name}{''.join(extra)}.log")
    return exp, log


@pytest.fixture(scope="module")
def ssvd_o(work: Path, pretrained: Path) -> tuple[Path, str]:
    """SSVD-O from the example config: adapter-only model files, ctc.ctc_lo trained in full."""
    return adapt(work, pretrained, "ssvd_o", SSVD_O_CONFIG, "--max_epoch", str(ADAPT_EPOCHS))


@pytest.fixture(scope="module")
def lora(work: Path, pretrained: Path) -> tuple[Path, str]:
    """LoRA with the same training options, saving full model files."""
    config = yaml.safe_load(SSVD_O_CONFIG.read_text())
    config.update(
        peft="lora",
        peft_conf={"target_modules": TARGETS, "rank": 4},
        peft_save="all",
        peft_modules_to_save=[],
    )
    (work / "lora.yaml").write_text(yaml.safe_dump(config))
    return adapt(work, pretrained, "lora", work / "lora.yaml", "--max_epoch", str(ADAPT_EPOCHS))


@pytest.fixture(scope="module")
def adapted_hypotheses(work: Path, ssvd_o: tuple[Path, str]) -> dict[str, str]:
    exp, _ = ssvd_o
    return decode(
        work,
        "espnet_plugins.bin.asr_inference",
        exp / "config.yaml",
        exp / "valid.acc.best.pth",
        "adapted",
        work / "data" / "test",
    )


def train_losses(log: str) -> list[float]:
    """The [train] loss of every epoch, from ESPnet's 'Nepoch results' log lines."""
    train_parts = re.findall(r"\d+epoch results: \[train\](.*?)\[valid\]", log)
    return [float(re.search(r"[ ,]loss=([0-9.e+-]+)", part).group(1)) for part in train_parts]


@pytest.mark.parametrize("run", ["ssvd_o", "lora"])
def test_adapter_training_lowers_the_loss_on_the_new_domain(run: str, request: pytest.FixtureRequest) -> None:
    _, log = request.getfixturevalue(run)
    losses = train_losses(log)
    assert len(losses) == ADAPT_EPOCHS
    assert losses[-1] < 0.9 * losses[0], losses


def test_budget_is_logged_and_written_to_the_experiment_as_table_and_data(ssvd_o: tuple[Path, str]) -> None:
    exp, log = ssvd_o
    table = (exp / "peft_budget.txt").read_text()
    assert table.splitlines()[1] in log and "adapter 'default' (ssvd_o)" in table
    budget = json.loads((exp / "peft_budget.json").read_text())
    adapter = budget["adapter"]
    assert adapter["method"] == "ssvd_o"
    layers = {module["name"]: module for module in adapter["modules"]}
    assert "encoder.encoders.1.feed_forward.w_2" in layers
    assert adapter["trainable"] == sum(module["total"] for module in layers.values())
    assert budget["modules_to_save"] == {"patterns": ["ctc.ctc_lo"], "parameters": 64 * 7 + 7}
    assert budget["trainable"] == adapter["trainable"] + budget["modules_to_save"]["parameters"]


def test_plugin_entry_points_start_without_download_attempts(ssvd_o: tuple[Path, str]) -> None:
    _, log = ssvd_o
    assert "nltk_data" not in log


def test_model_files_hold_only_adapter_entries_and_are_small(
    ssvd_o: tuple[Path, str], pretrained: Path
) -> None:
    exp, _ = ssvd_o
    state = torch.load(exp / "valid.acc.best.pth", map_location="cpu")
    adapters = [key for key in state if ".peft_adapters.default." in key]
    assert adapters
    assert {key for key in state if key not in adapters} == {
        "ctc.ctc_lo.weight",
        "ctc.ctc_lo.bias",
        *(key.split(".peft_adapters.")[0] + ".base_fingerprint" for key in adapters),
    }
    assert (exp / "valid.acc.best.pth").stat().st_size < 0.2 * pretrained.stat().st_size


def test_only_adapters_and_modules_to_save_changed(
    ssvd_o: tuple[Path, str], lora: tuple[Path, str], pretrained: Path
) -> None:
    base = torch.load(pretrained, map_location="cpu")
    full = torch.load(lora[0] / "valid.acc.best.pth", map_location="cpu")
    for key, value in base.items():
        assert torch.equal(full[key], value), key
    lora_b = [value for key, value in full.items() if key.endswith("lora_B")]
    assert len(lora_b) == 14 and all(value.abs().sum() > 0 for value in lora_b)
    adapter = torch.load(ssvd_o[0] / "valid.acc.best.pth", map_location="cpu")
    assert not torch.equal(adapter["ctc.ctc_lo.weight"], base["ctc.ctc_lo.weight"])
    assert all(value.abs().sum() > 0 for key, value in adapter.items() if key.endswith("ssvd_shift"))


def test_plugin_inference_decodes_every_utterance(work: Path, adapted_hypotheses: dict[str, str]) -> None:
    references = read_text_file(work / "data" / "test" / "text")
    assert adapted_hypotheses.keys() == references.keys()
    assert all(text and set(text) <= set(CHARACTERS) for text in adapted_hypotheses.values())
    assert sum(adapted_hypotheses[utt] == references[utt] for utt in references) >= len(references) // 2


def test_merged_inference_gives_the_same_hypotheses(
    work: Path, ssvd_o: tuple[Path, str], adapted_hypotheses: dict[str, str]
) -> None:
    exp, _ = ssvd_o
    merged = decode(
        work,
        "espnet_plugins.bin.asr_inference",
        exp / "config.yaml",
        exp / "valid.acc.best.pth",
        "merged",
        work / "data" / "test",
        "--peft_merge",
        "true",
    )
    assert merged == adapted_hypotheses


def test_exported_model_decodes_the_same_with_stock_espnet(
    work: Path, ssvd_o: tuple[Path, str], adapted_hypotheses: dict[str, str]
) -> None:
    exported = export_merged(work, ssvd_o[0], "export")
    config = yaml.safe_load((exported / "config.yaml").read_text())
    assert not [key for key in config if key.startswith("peft")]
    stock = decode(
        work,
        "espnet2.bin.asr_inference",
        exported / "config.yaml",
        exported / "model.pth",
        "stock",
        work / "data" / "test",
    )
    assert stock == adapted_hypotheses


def test_resumed_training_reaches_the_same_adapter(
    work: Path, pretrained: Path, ssvd_o: tuple[Path, str]
) -> None:
    exp, _ = adapt(work, pretrained, "resumed", SSVD_O_CONFIG, "--max_epoch", "2")
    _, log = adapt(
        work, pretrained, "resumed", SSVD_O_CONFIG, "--max_epoch", str(ADAPT_EPOCHS), "--resume", "true"
    )
    assert "The training was resumed" in log
    assert len(train_losses(log)) == ADAPT_EPOCHS - 2
    resumed = torch.load(exp / f"{ADAPT_EPOCHS}epoch.pth", map_location="cpu")
    straight = torch.load(ssvd_o[0] / f"{ADAPT_EPOCHS}epoch.pth", map_location="cpu")
    assert resumed.keys() == straight.keys()
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_resume_with_another_peft_block_is_refused_before_anything_is_written(
    work: Path, pretrained: Path, ssvd_o: tuple[Path, str]
) -> None:
    exp = work / "exp" / "resume_changed"
    shutil.copytree(ssvd_o[0], exp)
    written = {path.name: path.read_bytes() for path in exp.iterdir() if path.is_file()}
    config = yaml.safe_load(SSVD_O_CONFIG.read_text())
    config["peft_conf"] = {**config["peft_conf"], "outer_share": 0.25}
    (work / "changed.yaml").write_text(yaml.safe_dump(config))
    args = ["--config", str(work / "changed.yaml"), "--peft_pretrained", str(pretrained)]
    args += ["--output_dir", str(exp), "--max_epoch", str(ADAPT_EPOCHS + 1), "--resume", "true"]
    args += data_args("train", work / "data" / "adapt") + data_args("valid", work / "data" / "test")

    log = run_module(
        "espnet_plugins.bin.asr_train", args, work, work / "resume_changed.log", expect_failure=True
    )

    assert f"'--resume: {exp / 'checkpoint.pth'}' does not fit this model" in log
    assert "peft_adapters.default.ssvd_inner (55,) (model: (78,))" in log
    assert "It was written with another peft block; nothing in" in log
    assert {path.name: path.read_bytes() for path in exp.iterdir() if path.is_file()} == written
