"""``ssvd-peft merge``: a YAML spec or flags (flags win), models or adapters, and one message per
bad spec with nothing written."""

from __future__ import annotations

import pytest
import torch
import yaml
from adapter_cases import TinyNet, train_adapter
from safetensors.torch import load_file

from ssvd_peft.adapter_file import read_adapter_file
from ssvd_peft.cli import main
from ssvd_peft.merging.adapters import AdapterMerge
from ssvd_peft.merging.engine import merge_models


@pytest.fixture
def models(tmp_path):
    """A base and two fine-tunes (every tensor moved a little), saved as torch files."""
    base = TinyNet().state_dict()
    paths = []
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        tuned = {
            key: value + 0.05 * torch.randn(value.shape, generator=generator) for key, value in base.items()
        }
        paths.append(tmp_path / f"tuned{seed}.pth")
        torch.save(tuned, paths[-1])
    torch.save(base, tmp_path / "base.pth")
    return tmp_path / "base.pth", paths


def test_a_yaml_spec_merges_models_with_their_weights_and_knobs(models, tmp_path, capsys):
    base, (first, second) = models
    spec = {
        "method": "ties",
        "base": str(base),
        "models": [{"model": str(first), "weight": 0.3}, str(second)],
        "parameters": {"density": 0.5, "scaling": 0.9},
        "seed": 3,
        "output": str(tmp_path / "merged.safetensors"),
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(spec))
    assert main(["merge", "--config", str(tmp_path / "merge.yaml")]) == 0
    assert (
        "merged 2 models by ties (scaling=0.9, density=0.5, dare_drop=0.0, seed 3)" in capsys.readouterr().out
    )
    expected = merge_models(base, [first, second], "ties", [0.3, 1.0], seed=3, density=0.5, scaling=0.9)
    written = load_file(tmp_path / "merged.safetensors")
    assert written.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(written[key], expected[key])


def test_flags_override_the_spec(models, tmp_path):
    base, paths = models
    (tmp_path / "merge.yaml").write_text(
        yaml.safe_dump(
            {"method": "ties", "base": str(base), "models": [str(p) for p in paths], "output": "x.pth"}
        )
    )
    output = tmp_path / "ta.pth"
    argv = ["merge", "--config", str(tmp_path / "merge.yaml"), "--method", "task_arithmetic"]
    argv += ["--set", "scaling=0.5", "--weights", "1", "2", "--output", str(output)]
    assert main(argv) == 0
    expected = merge_models(base, paths, "task_arithmetic", [1.0, 2.0], scaling=0.5)
    written = torch.load(output, weights_only=True)
    for key in expected:
        torch.testing.assert_close(written[key], expected[key])


def test_adapters_merge_into_a_model_or_into_an_adapter(tmp_path, capsys):
    torch.save(TinyNet().state_dict(), tmp_path / "base.pth")
    adapters = [str(train_adapter("lora", seed, tmp_path / f"{seed}.safetensors")) for seed in (1, 2)]
    common = ["merge", "--base", str(tmp_path / "base.pth"), "--adapters", *adapters, "--method", "tsv_m"]
    assert main([*common, "--output", str(tmp_path / "model.pth")]) == 0
    merge = AdapterMerge(TinyNet().state_dict(), adapters, "tsv_m")
    written = torch.load(tmp_path / "model.pth", weights_only=True)
    for key, value in merge.state_dict().items():
        torch.testing.assert_close(written[key], value)

    assert (
        main([*common, "--as-adapter", "lora", "--rank", "3", "--output", str(tmp_path / "a.safetensors")])
        == 0
    )
    assert "reconstruction error" in capsys.readouterr().out
    kept = read_adapter_file(tmp_path / "a.safetensors")
    assert kept.method == "lora" and kept.config["rank"] == 3


ONE_MODEL = ["--models", "a.pth", "--output", "o.pth"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "ties", "--output", "o.pth"], "nothing to merge"),
        (["--method", "tie", *ONE_MODEL], "unknown merge method 'tie'"),
        (["--method", "ties", *ONE_MODEL, "--set", "lambda=1"], "no knob 'lambda'"),
        (["--method", "ties", *ONE_MODEL, "--set", "density"], "--set takes KNOB=VALUE"),
        (["--method", "ties", "--adapters", "a.safetensors", "--output", "o.pth"], "needs the base model"),
        (["--method", "ties", *ONE_MODEL, "--weights", "1", "2"], "2 weights for 1"),
        (ONE_MODEL, "`method:` is missing"),
        (["--method", "ties", *ONE_MODEL, "--rank", "2"], "keep_adapter is for merges"),
    ],
)
def test_bad_specs_get_one_message_and_no_file(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["merge", *argv]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unknown_spec_keys_are_named(tmp_path, capsys):
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump({"method": "ties", "output": "o.pth", "lambda": 1}))
    assert main(["merge", "--config", str(tmp_path / "merge.yaml")]) == 2
    assert "unknown key 'lambda'" in capsys.readouterr().err
