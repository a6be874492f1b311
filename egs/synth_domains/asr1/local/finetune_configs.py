"""Stage 8 set-up: one training YAML per fine-tuning method, every PEFT method at the same budget.

``full.yaml`` is a complete config for stock ``espnet2.bin.asr_train --init_param <base>``: the
base's model options (``config.yaml`` next to the base model) plus the fine-tuning options.
``<method>.yaml`` (lora, dora, pissa, ssvd, ssvd_o) holds the fine-tuning options and a ``peft:``
block for ``espnet_plugins.bin.asr_train``, which takes the model options from the base. The
budget B is the trainable count of the adapters file's ``budget`` entry on the base model; each
method's rank or k is the one whose count is closest to B. ``trainable.json`` records the
planned trainable count of every method (full: every parameter of the model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from espnet_plugins.modules import build_meta_model
from ssvd_peft.budget import KNOBS, equal_budget_configs, estimate_budget

MODEL_KEYS = (
    "frontend", "frontend_conf", "specaug", "specaug_conf", "normalize", "normalize_conf", "model",
    "model_conf", "preencoder", "preencoder_conf", "encoder", "encoder_conf", "postencoder",
    "postencoder_conf", "decoder", "decoder_conf", "ctc_conf", "token_list", "token_type", "bpemodel",
    "input_size", "init", "use_preprocessor", "non_linguistic_symbols", "cleaner", "g2p",
)  # fmt: skip


def peft_blocks(model: Any, adapters: dict[str, Any]) -> tuple[int, dict[str, dict[str, Any]]]:
    """(budget B, {method: peft_conf}) with each method's rank or k chosen for B."""
    targets = {"target_modules": list(adapters["target_modules"])}
    reference = dict(adapters["budget"])
    reference_method = reference.pop("method")
    options = {**targets, **adapters["methods"].get(reference_method, {}), **reference}
    budget = estimate_budget(model, reference_method, **options).trainable
    methods = {method: {**targets, **extra} for method, extra in adapters["methods"].items()}
    configs = equal_budget_configs(model, budget, methods)
    blocks = {
        method: {**methods[method], KNOBS[method]: getattr(config, KNOBS[method])}
        for method, config in configs.items()
    }
    return budget, blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base_config", type=Path, required=True, help="config.yaml of the base model")
    parser.add_argument("--finetune", type=Path, required=True, help="training options of every run")
    parser.add_argument("--adapters", type=Path, required=True, help="methods, targets and budget")
    parser.add_argument("--out_dir", type=Path, required=True)
    args = parser.parse_args()
    base = yaml.safe_load(args.base_config.read_text())
    finetune = yaml.safe_load(args.finetune.read_text())
    adapters = yaml.safe_load(args.adapters.read_text())
    model = build_meta_model(args.base_config)
    budget, blocks = peft_blocks(model, adapters)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    full = {key: base[key] for key in MODEL_KEYS if key in base}
    full.update(finetune)
    full.update(adapters.get("full") or {})
    (args.out_dir / "full.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    trainable = {"full": sum(parameter.numel() for parameter in model.parameters())}
    for method, block in blocks.items():
        config = {"peft": method, "peft_conf": block, "peft_save": "adapter", **finetune}
        (args.out_dir / f"{method}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        trainable[method] = estimate_budget(model, method, **block).trainable
    (args.out_dir / "trainable.json").write_text(json.dumps(trainable, indent=1) + "\n")
    knobs = ", ".join(f"{m} {KNOBS[m]}={b[KNOBS[m]]} ({trainable[m]:,})" for m, b in blocks.items())
    print(f"budget {budget:,} trainable parameters: {knobs}; full {trainable['full']:,}")


if __name__ == "__main__":
    main()
