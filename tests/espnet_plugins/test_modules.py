"""Listing the modules of an ESPnet model that adapters can target."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from espnet_runs import TINY_CONFIG
from tiny_corpus import write_token_list

from espnet_plugins.modules import stock_task, targetable_modules
from ssvd_peft.cli import main


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config.yaml, model.pth) of the tiny ASR model, written as ESPnet writes them."""
    root = tmp_path_factory.mktemp("base")
    task = stock_task("asr")
    args = task.get_parser().parse_args(
        ["--config", str(TINY_CONFIG), "--token_list", str(write_token_list(root / "tokens.txt"))]
    )
    model = task.build_model(args)
    (root / "config.yaml").write_text(yaml.safe_dump({**vars(args), "peft": "lora", "peft_conf": {}}))
    torch.save(model.state_dict(), root / "model.pth")
    return root / "config.yaml", root / "model.pth"


def test_lists_every_linear_layer_with_its_shape(base_model) -> None:
    rows = {row.name: (row.in_features, row.out_features) for row in targetable_modules(*base_model)}
    assert rows["encoder.encoders.0.self_attn.linear_q"] == (64, 64)
    assert rows["encoder.encoders.1.feed_forward.w_1"] == (64, 128)
    assert rows["decoder.decoders.0.src_attn.linear_v"] == (64, 64)
    assert rows["ctc.ctc_lo"] == (64, 7)
    assert len(rows) == 2 * 6 + 10 + 3


def test_refuses_a_model_file_that_does_not_fit_the_config(base_model, tmp_path: Path) -> None:
    config, model_file = base_model
    state = torch.load(model_file)
    state["encoder.encoders.0.feed_forward.w_1.weight"] = torch.zeros(32, 64)
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"w_1.weight is of shape \(32, 64\)"):
        targetable_modules(config, tmp_path / "other.pth")


def run_command(*arguments: str) -> str:
    """The ``ssvd-peft`` command (with the plugin's subcommands) in this process; its stdout. (The
    installed command in a process of its own: the last test.)"""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(arguments)) == 0
    return out.getvalue()


def test_the_modules_command_lists_the_model(base_model) -> None:
    config, model_file = base_model
    out = run_command("modules", "--config", str(config), "--model_file", str(model_file))
    assert "encoder.encoders.0.self_attn.linear_q" in out
    assert "64 -> 64" in out
    assert out.strip().endswith("25 nn.Linear modules")


def test_the_budget_command_prints_the_table_and_equal_budgets(base_model, tmp_path: Path) -> None:
    config, _ = base_model
    block = tmp_path / "peft.yaml"
    block.write_text(
        yaml.safe_dump({"peft": "lora", "peft_conf": {"target_modules": ["w_1", "w_2"], "rank": 4}})
    )
    out = run_command("budget", "--config", str(config), "--peft", str(block), "--compare")
    lora_total = 4 * (64 + 128) * 2 * (2 + 1)
    assert f"trainable {lora_total:,} of" in out
    assert "[encoder / feed_forward] 4 modules" in out
    assert "[decoder / feed_forward] 2 modules" in out
    assert f"  lora    this block        trainable {lora_total:,}" in out
    for method in ("dora", "pissa", "ssvd", "ssvd_o"):
        assert f"  {method:<7} {'rank' if method in ('dora', 'pissa') else 'k'} = " in out


def test_the_budget_comparison_keeps_the_blocks_own_options(base_model, tmp_path: Path) -> None:
    """An SSVD-O block with its own split and overrides is compared as it is, not from the defaults."""
    config, _ = base_model
    conf = {
        "target_modules": ["linear_q", "w_1"],
        "k_ratio": 0.4,
        "outer_share": 0.25,
        "module_overrides": {r"decoder\..*": {"k_ratio": 0.2}},
    }
    block = tmp_path / "peft.yaml"
    block.write_text(yaml.safe_dump({"peft": "ssvd_o", "peft_conf": conf}))
    out = run_command("budget", "--config", str(config), "--peft", str(block), "--compare")
    total = int(out.split("trainable ")[1].split(" of")[0].replace(",", ""))
    rows = [line for line in out.splitlines() if line.startswith("  ssvd_o ")]
    assert rows == [f"  ssvd_o  this block        trainable {total:,}"]


def test_the_budget_command_explains_a_missing_block(base_model, tmp_path: Path) -> None:
    config, _ = base_model
    block = tmp_path / "peft.yaml"
    block.write_text("batch_size: 4\n")
    result = subprocess.run(
        [sys.executable, "-m", "ssvd_peft.cli", "budget", "--config", str(config), "--peft", str(block)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "has no `peft:` key" in result.stderr
