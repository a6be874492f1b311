"""The ``ssvd-peft`` commands of the core: info on an adapter file, convert from an older format."""

from __future__ import annotations

import torch
from test_checkpoint import TARGETS, TinyNet, format_1_payload

from ssvd_peft.budget import estimate_budget
from ssvd_peft.checkpoint import load_adapter, save_adapter
from ssvd_peft.cli import main
from ssvd_peft.inject import inject_adapters


def test_info_names_the_method_options_layers_budget_and_base(tmp_path, capsys):
    model = TinyNet()
    options = {"k": 6, "outer_share": 0.25}
    inject_adapters(model, "ssvd_o", target_modules=TARGETS, **options)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    total = estimate_budget(TinyNet(), "ssvd_o", target_modules=TARGETS, **options).trainable
    assert "method ssvd_o, adapter name 'default'" in out
    assert "'k': 6, 'outer_share': 0.25" in out and "init_weights" not in out
    assert f"total: 3 layers, {total:,} trainable parameters" in out
    assert "proj_in" in out and "12x24" in out
    other = TinyNet(seed=1)
    inject_adapters(other, "ssvd_o", target_modules=TARGETS, **options)
    main(["info", str(save_adapter(other, tmp_path / "other.safetensors"))])
    digest = [line for line in out.splitlines() if line.startswith("base model: fingerprint")]
    assert digest and digest[0] not in capsys.readouterr().out, "another base model, another digest"


def test_convert_rewrites_a_format_1_file_in_the_current_format(tmp_path, capsys):
    model = TinyNet()
    torch.save(format_1_payload(model, "lora", {"rank": 2}), tmp_path / "old.pt")
    assert main(["convert", str(tmp_path / "old.pt"), str(tmp_path / "new.safetensors")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "new.safetensors").read_bytes()[:4] != b"PK\x03\x04"
    fresh = TinyNet()
    load_adapter(fresh, tmp_path / "new.safetensors")
    x = torch.randn(2, 12)
    assert torch.equal(fresh(x), model(x))


def test_a_bad_file_is_one_message_and_exit_code_2(tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"not an adapter")
    assert main(["info", str(tmp_path / "junk.safetensors")]) == 2
    assert "ssvd-peft: error:" in capsys.readouterr().err
