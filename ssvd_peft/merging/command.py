"""``ssvd-peft merge``: a merge described by a YAML file or by flags (flags win), in mergekit's spirit.

method: ties                         # any name of ssvd_peft.merging.merge_method_names()
base: exp/base/valid.acc.ave.pth
models:                              # full fine-tunes (state dict files) ...
  - model: exp/accent/valid.acc.ave.pth
    weight: 1.0
  - exp/child/valid.acc.ave.pth      # (weight 1)
# adapters:                          # ... or adapter files of any method (not both)
#   - adapter: exp/accent_lora/valid.acc.best.pth
#     config: exp/accent_lora/config.yaml   # ESPnet model files: their experiment's config
parameters: {density: 0.3, scaling: 0.8}   # the method's knobs
seed: 0
output: exp/merged.pth               # .safetensors or a torch file
# keep_adapter: {form: lora, rank: 8}      # adapters: write the merge as an adapter file

ssvd-peft merge --config merge.yaml
ssvd-peft merge --base B.pth --models A.pth C.pth --method ties --set density=0.3 --output M.pth
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.merging.adapters import AdapterMerge
from ssvd_peft.merging.engine import DEFAULT_VOCABULARY, merge_models_to_file
from ssvd_peft.merging.registry import get_merge_method, merge_method_names

SPEC_KEYS = (
    "method",
    "base",
    "models",
    "adapters",
    "parameters",
    "seed",
    "output",
    "vocabulary",
    "max_change",
    "keep_adapter",
)


@dataclass
class MergeInput:
    """One model or adapter file, its weight and (ESPnet adapter files) its experiment's config."""

    path: Path
    weight: float = 1.0
    config: Path | None = None


@dataclass
class MergeSpec:
    """Everything one merge needs (see the module docstring)."""

    method: str
    output: Path
    base: Path | None = None
    models: list[MergeInput] = field(default_factory=list)
    adapters: list[MergeInput] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    vocabulary: list[str] = field(default_factory=lambda: list(DEFAULT_VOCABULARY))
    max_change: float | None = 1.0
    keep_adapter: dict[str, Any] | None = None

    def check(self) -> None:
        """One clear message for a spec that cannot run, before anything is read."""
        get_merge_method(self.method).resolved_knobs(self.parameters)
        if self.models and self.adapters:
            raise PeftConfigError(
                "a merge takes models or adapters, not both; fold each adapter into the base first "
                "(a merge of that one adapter, or espnet_plugins.bin.export_merged)"
            )
        if not self.models and not self.adapters:
            raise PeftConfigError("nothing to merge: give models (full fine-tunes) or adapters")
        if self.adapters and self.base is None:
            raise PeftConfigError("merging adapters needs the base model they were trained on (base:)")
        if self.keep_adapter is not None and not self.adapters:
            raise PeftConfigError("keep_adapter is for merges of adapters; models merge into a model")
        unknown = set(self.keep_adapter or {}) - {"form", "rank"}
        if unknown:
            raise PeftConfigError(f"keep_adapter takes form and rank; got {sorted(unknown)}")

    def run(self) -> str:
        """Merge and write the output; a one-paragraph report."""
        self.check()
        start = time.perf_counter()
        inputs = self.adapters or self.models
        weights = [item.weight for item in inputs]
        if self.models:
            merge_models_to_file(
                self.base,
                [item.path for item in self.models],
                self.output,
                self.method,
                weights,
                self.seed,
                self.vocabulary,
                self.max_change,
                **self.parameters,
            )
            detail = "a merged model"
        else:
            merge = AdapterMerge(
                self.base,
                [item.path for item in self.adapters],
                self.method,
                weights,
                self.seed,
                self.vocabulary,
                [item.config for item in self.adapters],
                **self.parameters,
            )
            if self.keep_adapter is None:
                merge.save(self.output)
                detail = "the base with the merged update folded in"
            else:
                merged = merge.adapter(self.keep_adapter.get("form"), self.keep_adapter.get("rank"))
                merged.save(self.output)
                detail = merged.summary()
        knobs = get_merge_method(self.method).resolved_knobs(self.parameters)
        listed = ", ".join(f"{key}={value}" for key, value in knobs.items()) or "no knobs"
        return (
            f"merged {len(inputs)} {'adapters' if self.adapters else 'models'} by {self.method} ({listed}, "
            f"seed {self.seed}) in {time.perf_counter() - start:.1f} s: {self.output} holds {detail}"
        )


def spec_from_dict(values: dict[str, Any], source: str) -> MergeSpec:
    """A ``MergeSpec`` from a YAML mapping; unknown keys and malformed entries are refused."""
    unknown = sorted(set(values) - set(SPEC_KEYS))
    if unknown:
        raise PeftConfigError(
            f"{source}: unknown key {unknown[0]!r}; a merge spec has {', '.join(SPEC_KEYS)}"
        )
    for key in ("method", "output"):
        if not values.get(key):
            raise PeftConfigError(f"{source}: `{key}:` is missing")
    return MergeSpec(
        method=str(values["method"]),
        output=Path(values["output"]),
        base=Path(values["base"]) if values.get("base") else None,
        models=[merge_input(item, "model", source) for item in values.get("models") or []],
        adapters=[merge_input(item, "adapter", source) for item in values.get("adapters") or []],
        parameters=dict(values.get("parameters") or {}),
        seed=int(values.get("seed", 0)),
        vocabulary=list(values.get("vocabulary", DEFAULT_VOCABULARY)),
        max_change=values.get("max_change", 1.0),
        keep_adapter=values.get("keep_adapter"),
    )


def merge_input(item: Any, kind: str, source: str) -> MergeInput:
    """A list entry: a path, or {<kind>: path, weight: w, config: path}."""
    if isinstance(item, str):
        return MergeInput(Path(item))
    if not isinstance(item, dict) or kind not in item:
        raise PeftConfigError(f"{source}: each {kind} is a path or a mapping with `{kind}:`; got {item!r}")
    unknown = sorted(set(item) - {kind, "weight", "config"})
    if unknown:
        raise PeftConfigError(f"{source}: a {kind} entry takes {kind}, weight and config; got {unknown[0]!r}")
    config = item.get("config")
    return MergeInput(Path(item[kind]), float(item.get("weight", 1.0)), Path(config) if config else None)


def add_merge_parser(commands: Any) -> None:
    """The ``merge`` subcommand of ``ssvd-peft``."""
    merge = commands.add_parser(
        "merge",
        help="merge fine-tuned models or adapters of one base model",
        description="Merge fine-tuned models or adapters of one base model, from a YAML spec "
        "(method, base, models or adapters with weights, parameters, seed, output, keep_adapter) "
        "or from flags (which override the spec).",
        epilog=f"methods: {', '.join(merge_method_names())}",
    )
    merge.add_argument("--config", type=Path, help="a YAML merge spec (flags override its values)")
    merge.add_argument("--method", help="merge method, e.g. ties, tsv_m, boosted_tsv_m")
    merge.add_argument("--base", type=Path, help="the base model (state dict file)")
    merge.add_argument("--models", nargs="+", type=Path, help="full fine-tunes to merge")
    merge.add_argument("--adapters", nargs="+", type=Path, help="adapter files to merge")
    merge.add_argument(
        "--adapter-configs", nargs="+", type=Path, help="config.yaml of each ESPnet adapter file"
    )
    merge.add_argument("--weights", nargs="+", type=float, help="one weight per model or adapter")
    merge.add_argument(
        "--set", action="append", default=[], metavar="KNOB=VALUE", help="a knob of the method (repeatable)"
    )
    merge.add_argument("--seed", type=int)
    merge.add_argument("--output", type=Path, help="the merged model (or adapter) file to write")
    merge.add_argument(
        "--as-adapter", choices=("lora", "ssvd_core", "auto"), help="keep an adapter merge as an adapter"
    )
    merge.add_argument("--rank", type=int, help="rank of the merged LoRA (--as-adapter lora)")
    merge.set_defaults(func=run_merge_command)


def spec_from_arguments(args: argparse.Namespace) -> MergeSpec:
    """The YAML spec (if any) with every given flag in place of its value."""
    values: dict[str, Any] = {}
    source = "command line"
    if args.config is not None:
        if not args.config.is_file():
            raise PeftConfigError(f"merge spec {str(args.config)!r} does not exist")
        values = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
        if not isinstance(values, dict):
            raise PeftConfigError(f"{args.config}: a merge spec is a mapping of {', '.join(SPEC_KEYS)}")
        source = str(args.config)
    for key in ("method", "base", "output", "seed"):
        if getattr(args, key) is not None:
            values[key] = str(getattr(args, key)) if key != "seed" else args.seed
    for key in ("models", "adapters"):
        if getattr(args, key):
            values[key] = [str(path) for path in getattr(args, key)]
    spec = spec_from_dict(values, source)
    inputs = spec.adapters or spec.models
    if args.weights is not None:
        if len(args.weights) != len(inputs):
            raise PeftConfigError(f"{len(args.weights)} weights for {len(inputs)} inputs; give one per input")
        for item, weight in zip(inputs, args.weights, strict=True):
            item.weight = weight
    if args.adapter_configs is not None:
        if len(args.adapter_configs) != len(spec.adapters):
            raise PeftConfigError(
                f"{len(args.adapter_configs)} configs for {len(spec.adapters)} adapters; give one per adapter"
            )
        for item, config in zip(spec.adapters, args.adapter_configs, strict=True):
            item.config = config
    for assignment in args.set:
        key, separator, value = assignment.partition("=")
        if not separator or not key:
            raise PeftConfigError(f"--set takes KNOB=VALUE, got {assignment!r}")
        spec.parameters[key.strip()] = yaml.safe_load(value)
    if args.as_adapter is not None or args.rank is not None:
        kept = dict(spec.keep_adapter or {})
        if args.as_adapter is not None:
            kept["form"] = None if args.as_adapter == "auto" else args.as_adapter
        if args.rank is not None:
            kept["rank"] = args.rank
        spec.keep_adapter = kept
    return spec


def run_merge_command(args: argparse.Namespace) -> None:
    print(spec_from_arguments(args).run())
