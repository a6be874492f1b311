"""Bad input to the ESPnet entry points: one clear message, nothing half-written.

ESPnet's own adapters next to a peft block, damaged model files given to inference and export,
and (with a real training run) a --resume whose checkpoint was written with another peft block.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml
from espnet_runs import TINY_CONFIG
from tiny_corpus import write_token_list

from espnet_plugins.modules import stock_task
from espnet_plugins.options import peft_options
from espnet_plugins.tasks.asr import PeftASRTask
from ssvd_peft.adapter_state import AdapterCheckpointError
from ssvd_peft.config import PeftConfigError

PEFT = {"peft": "lora", "peft_conf": {"target_modules": ["linear_q", "w_1"], "rank": 2}}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stock tiny ASR model file with its config.yaml next to it."""
    root = tmp_path_factory.mktemp("base")
    task = stock_task("asr")
    args = task.get_parser().parse_args(
        ["--config", str(TINY_CONFIG), "--token_list", str(write_token_list(root / "tokens.txt"))]
    )
    torch.manual_seed(0)
    model = task.build_model(args)
    (root / "config.yaml").write_text(yaml.safe_dump(vars(args)))
    torch.save(model.state_dict(), root / "model.pth")
    return root / "model.pth"


@pytest.fixture
def adapted_experiment(base_model: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(config.yaml, adapter-only model file) of an adapted model, as training writes them."""
    exp = tmp_path / "exp"
    exp.mkdir()
    config = {**PEFT, "peft_pretrained": str(base_model), "output_dir": str(exp)}
    (exp / "in.yaml").write_text(yaml.safe_dump(config))
    args = PeftASRTask.get_parser().parse_args(["--config", str(exp / "in.yaml")])
    PeftASRTask.check_required_command_args(args)
    model = PeftASRTask.build_model(args)
    (exp / "config.yaml").write_text(yaml.safe_dump(vars(args)))
    torch.save(model.state_dict(), exp / "model.pth")
    return exp / "config.yaml", exp / "model.pth"


def test_espnets_own_adapter_next_to_a_peft_block_is_refused(base_model: Path, tmp_path: Path) -> None:
    config = {**PEFT, "peft_pretrained": str(base_model), "use_adapter": True, "adapter": "lora"}
    (tmp_path / "in.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(
        PeftConfigError, match=r"--peft lora and ESPnet's own --use_adapter true \(--adapter lora\)"
    ):
        PeftASRTask.main(cmd=["--config", str(tmp_path / "in.yaml"), "--output_dir", str(tmp_path / "exp")])
    assert not (tmp_path / "exp").exists()


def test_a_training_config_with_both_adapters_is_refused_at_inference_too() -> None:
    args = argparse.Namespace(peft="ssvd", peft_conf={}, use_adapter=True, adapter="lora")
    with pytest.raises(PeftConfigError, match="Use one of them"):
        peft_options(args)
    assert peft_options(argparse.Namespace(peft="ssvd", peft_conf={}, use_adapter=False)) is not None


@pytest.mark.parametrize(
    ("damage", "cause"),
    [
        ("truncate", "is not a readable model file"),
        ("empty", "EOFError"),
        ("pickle", "UnpicklingError"),
        ("directory", "does not exist"),
    ],
)
def test_a_damaged_model_file_for_inference_names_the_file(damage, cause, adapted_experiment) -> None:
    config, model_file = adapted_experiment
    if damage == "truncate":
        model_file.write_bytes(model_file.read_bytes()[:-200])
    elif damage == "empty":
        model_file.write_bytes(b"")
    elif damage == "pickle":
        torch.save({"module": argparse.Namespace(a=1)}, model_file)
    else:
        model_file.unlink()
        model_file.mkdir()
    with pytest.raises(AdapterCheckpointError) as caught:
        PeftASRTask.build_model_from_file(config, model_file)
    message = str(caught.value)
    assert f"model file '{model_file}'" in message and cause in message
    assert "weights_only=False" not in message


def test_an_intact_adapter_file_loads(adapted_experiment) -> None:
    config, model_file = adapted_experiment
    model, _ = PeftASRTask.build_model_from_file(config, model_file)
    assert any(".peft_adapters.default." in name for name, _ in model.named_parameters())
