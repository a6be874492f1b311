"""The speech-to-text (OWSM-style) task with adapters.

A tiny S2T model (Transformer encoder and decoder, d=32, OWSM's special tokens, character
tokens) is built by stock ``S2TTask`` and saved with its config.yaml. In process,
``PeftS2TTask`` builds the adapted model from a config that holds only the peft block, takes a
training step, and reloads an adapter-only state dict. Through the entry points,
``espnet_plugins.bin.s2t_train`` trains the adapter on Kaldi-style data (text, text_prev,
text_ctc), ``espnet_plugins.bin.s2t_inference`` decodes, and the merged export decodes the same
with stock ``espnet2.bin.s2t_inference``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml
from espnet2.tasks.s2t import S2TTask
from espnet_runs import read_text_file, run_module
from tiny_corpus import write_data_dir

from espnet_plugins.tasks.s2t import PeftS2TTask
from ssvd_peft.inject import iter_adapter_layers

SPECIAL = ["<na>", "<nolang>", "<en>", "<asr>", "<notimestamps>", "<0.00>", "<sop>"]
TOKENS = ["<blank>", "<unk>", *SPECIAL, "a", "b", "c", "d", "<sos>", "<eos>"]
PREPROCESSOR = {
    "fs": 8000,
    "speech_length": 1.0,
    "speech_init_silence": 0.1,
    "text_prev_apply_prob": 0.0,
    "time_apply_prob": 1.0,
    "notime_symbol": "<notimestamps>",
    "first_time_symbol": "<0.00>",
    "last_time_symbol": "<0.00>",
}
MODEL = {
    "token_type": "char",
    "preprocessor_conf": PREPROCESSOR,
    "frontend_conf": {"fs": 8000, "n_fft": 256, "hop_length": 80, "n_mels": 20},
    "encoder": "transformer",
    "encoder_conf": {"output_size": 32, "attention_heads": 2, "linear_units": 64, "num_blocks": 2},
    "decoder": "transformer",
    "decoder_conf": {"attention_heads": 2, "linear_units": 64, "num_blocks": 1},
}
PEFT = {
    "peft": "ssvd_o",
    "peft_conf": {"target_modules": ["linear_q", "linear_v", "w_1", "w_2"], "k_ratio": 0.25},
    "peft_modules_to_save": ["ctc.ctc_lo"],
}


def parse(task: type, config: dict, path: Path) -> argparse.Namespace:
    path.write_text(yaml.safe_dump(config))
    args = task.get_parser().parse_args(["--config", str(path)])
    task.check_required_command_args(args)
    return args


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stock S2T model file with its config.yaml next to it."""
    root = tmp_path_factory.mktemp("s2t")
    (root / "tokens.txt").write_text("\n".join(TOKENS) + "\n")
    (root / "special.txt").write_text("\n".join(SPECIAL) + "\n")
    files = {"token_list": str(root / "tokens.txt"), "non_linguistic_symbols": str(root / "special.txt")}
    args = parse(S2TTask, {**MODEL, **files, "output_dir": str(root)}, root / "in.yaml")
    torch.manual_seed(0)
    model = S2TTask.build_model(args)
    (root / "config.yaml").write_text(yaml.safe_dump(vars(args)))
    torch.save(model.state_dict(), root / "model.pth")
    return root / "model.pth"


@pytest.fixture
def adapted(pretrained: Path, tmp_path: Path) -> torch.nn.Module:
    config = {**PEFT, "peft_pretrained": str(pretrained), "output_dir": str(tmp_path / "exp")}
    return PeftS2TTask.build_model(parse(PeftS2TTask, config, tmp_path / "finetune.yaml"))


def batch() -> dict[str, torch.Tensor]:
    ids = {token: index for index, token in enumerate(TOKENS)}
    generator = torch.Generator().manual_seed(0)
    text = torch.tensor([[ids[t] for t in ("<en>", "<asr>", "<notimestamps>", "a", "b")]] * 2)
    return {
        "speech": 0.1 * torch.randn(2, 4000, generator=generator),
        "speech_lengths": torch.tensor([4000, 4000]),
        "text": text,
        "text_lengths": torch.tensor([5, 5]),
        "text_prev": torch.tensor([[ids["<na>"]]] * 2),
        "text_prev_lengths": torch.tensor([1, 1]),
        "text_ctc": text[:, 3:],
        "text_ctc_lengths": torch.tensor([2, 2]),
    }


def test_the_config_with_only_a_peft_block_builds_the_pretrained_architecture(adapted, pretrained) -> None:
    assert len(list(iter_adapter_layers(adapted))) == 2 * 4 + 6
    base = torch.load(pretrained, map_location="cpu")
    for name, layer in iter_adapter_layers(adapted):
        assert torch.equal(layer.base_layer.weight, base[f"{name}.weight"])
    assert torch.equal(adapted.encoder.embed.conv[0].weight, base["encoder.embed.conv.0.weight"])


def test_svd_adapters_factorise_the_loaded_pretrained_weights(adapted, pretrained) -> None:
    base = torch.load(pretrained, map_location="cpu")
    for name, layer in iter_adapter_layers(adapted):
        adapter = layer.peft_adapters["default"]
        expected = torch.linalg.svdvals(base[f"{name}.weight"].double())[: adapter.k]
        torch.testing.assert_close(adapter.singular_values.double(), expected, rtol=1e-5, atol=1e-6)


def test_init_param_is_loaded_before_injection_and_recorded(pretrained, tmp_path: Path) -> None:
    config = {**PEFT, "init_param": [str(pretrained)], "token_list": str(pretrained.parent / "tokens.txt")}
    args = parse(PeftS2TTask, {**MODEL, **config, "output_dir": str(tmp_path)}, tmp_path / "finetune.yaml")
    model = PeftS2TTask.build_model(args)
    assert args.init_param == []
    assert args.peft_init_param == [str(pretrained)]
    base = torch.load(pretrained, map_location="cpu")
    for name, layer in iter_adapter_layers(model):
        assert torch.equal(layer.base_layer.weight, base[f"{name}.weight"])


def test_a_training_step_updates_only_adapters_and_modules_to_save(adapted) -> None:
    before = {name: value.clone() for name, value in adapted.state_dict().items()}
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=0.01)
    loss, _, _ = adapted(**batch())
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    names = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert names and all(
        ".peft_adapters.default." in name or name.startswith("ctc.ctc_lo.") for name in names
    )
    after = adapted.state_dict()
    assert any(not torch.equal(after[key], before[key]) for key in after if key.endswith("ssvd_shift"))


def test_an_adapter_only_file_rebuilds_the_same_model(adapted, tmp_path: Path) -> None:
    with torch.no_grad():
        for parameter in adapted.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01 * torch.randn_like(parameter))
    args_path = tmp_path / "exp" / "config.yaml"
    args_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(adapted.state_dict(), tmp_path / "exp" / "adapter.pth")
    config = yaml.safe_load((tmp_path / "finetune.yaml").read_text())
    args = parse(PeftS2TTask, config, tmp_path / "again.yaml")
    args_path.write_text(yaml.safe_dump(vars(args)))
    rebuilt, _ = PeftS2TTask.build_model_from_file(args_path, tmp_path / "exp" / "adapter.pth")
    adapted.eval()
    rebuilt.eval()
    inputs = batch()
    encoded, _ = adapted.encode(inputs["speech"], inputs["speech_lengths"])
    torch.testing.assert_close(rebuilt.encode(inputs["speech"], inputs["speech_lengths"])[0], encoded)


def s2t_data_dir(path: Path) -> Path:
    """Kaldi-style S2T data: text with its <lang><task><notimestamps> prefix, text_prev, text_ctc."""
    write_data_dir(path, 16, shift=1.0, seed=0)
    rows = read_text_file(path / "text")
    files = {
        "text": "<en><asr><notimestamps>{}",
        "text_prev": "<na>",
        "text_ctc": "{}",
    }
    for name, template in files.items():
        (path / name).write_text("".join(f"{utt} {template.format(text)}\n" for utt, text in rows.items()))
    return path


def s2t_data_args(prefix: str, data: Path) -> list[str]:
    args = [f"--{prefix}_data_path_and_name_and_type", f"{data}/wav.scp,speech,sound"]
    for name in ("text", "text_prev", "text_ctc"):
        args += [f"--{prefix}_data_path_and_name_and_type", f"{data}/{name},{name},text"]
    return [*args, f"--{prefix}_shape_file", f"{data}/speech_shape"]


def train_two_epochs(block: dict, pretrained: Path, data: Path, work: Path) -> str:
    """``espnet_plugins.bin.s2t_train`` with ``block`` for 2 epochs into ``work``/exp; its log."""
    config = {**block, "batch_type": "unsorted", "batch_size": 8, "num_workers": 0, "max_epoch": 2}
    config.update(optim="adam", optim_conf={"lr": 0.01}, use_matplotlib=False, use_tensorboard=False)
    (work / "train.yaml").write_text(yaml.safe_dump(config))
    args = ["--config", "train.yaml", "--peft_pretrained", str(pretrained), "--output_dir", "exp"]
    args += s2t_data_args("train", data) + s2t_data_args("valid", data)
    return run_module("espnet_plugins.bin.s2t_train", args, work, work / "train.log")


def decode_with_plugin(data: Path, work: Path, output: str) -> None:
    """The plugin's s2t_inference of ``work``/exp/2epoch.pth on ``data``, into ``work``/``output``."""
    model = ["--s2t_train_config", "exp/config.yaml", "--s2t_model_file", "exp/2epoch.pth"]
    args = [*model, "--output_dir", output, *decoding_args(data)]
    run_module("espnet_plugins.bin.s2t_inference", args, work, work / f"{output}.log")


def decoding_args(data: Path) -> list[str]:
    args = ["--data_path_and_name_and_type", f"{data}/wav.scp,speech,sound", "--batch_size", "1"]
    return [*args, "--beam_size", "2", "--ngpu", "0", "--lang_sym", "<en>", "--task_sym", "<asr>"]


def test_entry_points_train_decode_and_export(pretrained: Path, tmp_path: Path) -> None:
    data = s2t_data_dir(tmp_path / "data")
    log = train_two_epochs(PEFT, pretrained, data, tmp_path)
    assert "2epoch results" in log
    assert (tmp_path / "exp" / "peft_budget.txt").is_file() and (
        tmp_path / "exp" / "peft_budget.json"
    ).is_file()
    assert (tmp_path / "exp" / "2epoch.pth").stat().st_size < 0.25 * pretrained.stat().st_size

    decode_with_plugin(data, tmp_path, "adapted")
    decoding = decoding_args(data)
    model = ["--s2t_train_config", "exp/config.yaml", "--s2t_model_file", "exp/2epoch.pth"]
    run_module(
        "espnet_plugins.bin.export_merged",
        ["--task", "s2t", *model, "--output_dir", "export"],
        tmp_path,
        tmp_path / "export.log",
    )
    exported = ["--s2t_train_config", "export/config.yaml", "--s2t_model_file", "export/model.pth"]
    run_module(
        "espnet2.bin.s2t_inference",
        [*exported, "--output_dir", "stock", *decoding],
        tmp_path,
        tmp_path / "stock.log",
    )
    adapted = read_text_file(tmp_path / "adapted" / "1best_recog" / "text")
    assert adapted.keys() == read_text_file(data / "text").keys()
    assert read_text_file(tmp_path / "stock" / "1best_recog" / "text") == adapted


def test_an_s2t_model_given_to_the_asr_task_is_named_as_the_cause(pretrained: Path, tmp_path: Path) -> None:
    """OWSM's model_conf (sym_na, ...) does not build an ASR model: the error says which file and task."""
    from espnet_plugins.pretrained import PretrainedModelError
    from espnet_plugins.tasks.asr import PeftASRTask

    owsm = tmp_path / "owsm"
    owsm.mkdir()
    config = yaml.safe_load((pretrained.parent / "config.yaml").read_text())
    config["model_conf"] = {"sym_na": "<na>", "ctc_weight": 0.3}  # as OWSM's config.yaml sets it
    (owsm / "config.yaml").write_text(yaml.safe_dump(config))
    (owsm / "model.pth").write_bytes(pretrained.read_bytes())
    finetune = {**PEFT, "peft_pretrained": str(owsm / "model.pth"), "output_dir": str(tmp_path / "exp")}
    args = parse(PeftASRTask, finetune, tmp_path / "finetune.yaml")
    with pytest.raises(PretrainedModelError) as caught:
        PeftASRTask.build_model(args)
    message = str(caught.value)
    assert f"--peft_pretrained '{owsm / 'model.pth'}'" in message
    assert str(owsm / "config.yaml") in message and "sym_na" in message
    assert "espnet_plugins.bin.s2t_train" in message


FUSION = {"fusion": {"variant": "ladder", "taps": "all", "reduction": 4, "attention_heads": 2}}


def test_fusion_with_adapters_trains_the_head_decoder_ctc_and_adapters_only(
    pretrained, tmp_path: Path
) -> None:
    config = {**PEFT, **FUSION, "peft_pretrained": str(pretrained), "output_dir": str(tmp_path / "exp")}
    model = PeftS2TTask.build_model(parse(PeftS2TTask, config, tmp_path / "fusion.yaml"))
    loss, _, _ = model(**batch())
    loss.backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(name.startswith("encoder.head.") for name in trainable)
    assert all(
        name.startswith(("encoder.head.", "decoder.", "ctc.")) or ".peft_adapters.default." in name
        for name in trainable
    )
    encoder_adapters = [
        p for name, p in model.named_parameters() if name.startswith("encoder.taps.") and p.requires_grad
    ]
    assert encoder_adapters and all(p.grad is not None for p in encoder_adapters)
    saved = set(model.state_dict())
    assert saved >= {name for name in trainable if not name.startswith("decoder.")}
    assert not any(
        name.startswith("encoder.taps.") and ".peft_adapters." not in name
        for name in saved - {name for name in saved if name.endswith("base_fingerprint")}
    )


def test_fusion_through_the_s2t_entry_points_decodes(pretrained: Path, tmp_path: Path) -> None:
    data = s2t_data_dir(tmp_path / "data")
    log = train_two_epochs(FUSION, pretrained, data, tmp_path)
    assert "2epoch results" in log and "Feature fusion (Ladder" in log
    decode_with_plugin(data, tmp_path, "fused")
    assert (
        read_text_file(tmp_path / "fused" / "1best_recog" / "text").keys()
        == read_text_file(data / "text").keys()
    )
