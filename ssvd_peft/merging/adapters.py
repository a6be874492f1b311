"""Merging per-domain adapters of any method through their dense updates, layer by layer.

    merge = AdapterMerge("base.pth", ["accent.safetensors", "exp/child/valid.acc.best.pth"], "ties",
                         density=0.3)
    merge.save("merged.pth")                         # (a) folded into the base: a plain model
    merge.adapter(rank=8).save("merged.safetensors")  # (b) kept as an adapter (LoRA of rank 8)

Every adapter file (``ssvd_peft.adapter_file``; ESPnet's adapter-only model files included) was
trained on the base model; each adds, per adapted layer, one task update delta_t = W'_t - W against
the ORIGINAL W (``Adapter.task_deltas``; an HDMoLE adapter adds one per domain), never its factors
(sum_t B_t times sum_t A_t would add cross terms). A layer an adapter does not adapt has
delta_t = 0 there. The updates merge as full models' task vectors do (``merge_one``: base W, models
W + delta_t, in float64, so a rank-r update has rank r exactly); the full tensors of
``modules_to_save`` merge as the models' tensors.

Outputs:
- ``tensors`` / ``state_dict`` / ``save``: the base with W + delta in every adapted layer, read
  and written tensor by tensor;
- ``adapter(form="lora", rank=r')``: per layer the truncated SVD of delta, B = U_r' diag(sqrt s),
  A = diag(sqrt s) Vh_r' (alpha = r', so the scale is 1), with its relative reconstruction error
  ||delta - B A||_F / ||delta||_F (default r': the largest rank among the tasks' updates of the
  layer, the size of one input adapter);
- ``adapter(form="ssvd_core")``, for SSVD and SSVD-O adapters (and merged ones): every task's update
  is U_k M_t V_k^T in the same top-k subspace of W, so the k x k cores merge directly (base
  diag(s_k), models diag(s_k) + M_t) and the result is a subspace adapter of the same k (method
  ``ssvd_core``: W' = W + U_k M V_k^T). Task Arithmetic and the SVD-based merges give the dense
  merge's update exactly (they commute with U_k . V_k^T); entry-wise merges (TIES, DARE, PCB) act on
  the core's entries.

Adapters of another base model (fingerprints), layers or saved modules the base lacks, and merges
a form cannot express are refused with one message each; files are written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssvd_peft.adapter_file import AdapterFile, read_adapter_file, write_adapter_file
from ssvd_peft.adapter_state import (
    FINGERPRINT_RTOL,
    AdapterCheckpointError,
    split_fingerprints,
    without_empty_leftovers,
)
from ssvd_peft.config import AdapterConfig, config_from_dict
from ssvd_peft.errors import PeftConfigError
from ssvd_peft.layers.base import ADAPTERS_ATTR, DEFAULT_ADAPTER, Adapter, AdapterLinear, weight_fingerprint
from ssvd_peft.merging.engine import DEFAULT_VOCABULARY, ModelInput, merge_one
from ssvd_peft.merging.memory import release_freed_memory
from ssvd_peft.merging.ops import nonzero_rank
from ssvd_peft.merging.registry import get_merge_method
from ssvd_peft.merging.sinks import write_state_dict
from ssvd_peft.merging.sources import TensorSource, TensorSpec, open_source

AdapterInput = str | Path | AdapterFile
SUBSPACE_METHODS = ("ssvd", "ssvd_o", "ssvd_core")
FORMS = ("lora", "ssvd_core")
MERGE_DTYPE = torch.float64


@dataclass
class AdapterTask:
    """One adapter file: its contents, config, label, the layers it adapts, the full tensors of its
    saved modules, and how many tasks it holds (an HDMoLE adapter: one per domain)."""

    file: AdapterFile
    config: AdapterConfig
    label: str
    layers: list[str]
    saved: dict[str, torch.Tensor]
    tasks: int = 1

    def layer_adapter(self, layer: str, weight: torch.Tensor) -> tuple[Adapter, nn.Linear]:
        """This file's adapter of ``layer``, built on a float64 copy of the base ``weight`` and loaded
        with the file's entries."""
        base_layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=MERGE_DTYPE)
        base_layer.weight.data.copy_(weight.to(MERGE_DTYPE))
        wrapper = AdapterLinear(base_layer)
        adapter = self.config.for_module(layer).build(wrapper.base_layer)
        wrapper.add_adapter(self.file.adapter_name, adapter)
        prefix = f"{layer}."
        entries = {
            key[len(prefix) :]: value
            for key, value in self.file.tensors.items()
            if key.startswith(f"{prefix}{ADAPTERS_ATTR}.")
        }
        entries = without_empty_leftovers(entries, wrapper)
        missing, unexpected = wrapper.load_state_dict(entries, strict=False)
        missing = [key for key in missing if key.startswith(f"{ADAPTERS_ATTR}.")]
        if missing or unexpected:
            raise AdapterCheckpointError(
                f"adapter {self.label!r} does not fit its own config at {layer}: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}; the file is damaged or its config.yaml is not the one it "
                "was trained with"
            )
        return adapter, wrapper.base_layer

    def deltas(self, layer: str, weight: torch.Tensor) -> list[torch.Tensor]:
        """delta_t of every task of this file at ``layer`` (zeros where it does not adapt it)."""
        if layer not in self.layers:
            return [torch.zeros(weight.shape, dtype=MERGE_DTYPE)] * self.tasks
        adapter, base_layer = self.layer_adapter(layer, weight)
        with torch.no_grad():
            return [delta.to(MERGE_DTYPE) for delta in adapter.task_deltas(base_layer)]


@dataclass
class MergedAdapter:
    """A merged adapter (``file``) and, for the LoRA form, each layer's relative reconstruction error
    ||delta - B A||_F / ||delta||_F (``errors``) and the whole adapter's (``error``)."""

    file: AdapterFile
    errors: dict[str, float] = field(default_factory=dict)
    error: float | None = None

    def save(self, path: str | Path) -> Path:
        return write_adapter_file(self.file, path)

    def summary(self) -> str:
        size = sum(value.numel() for key, value in self.file.tensors.items() if ADAPTERS_ATTR in key)
        text = (
            f"merged adapter: method {self.file.method}, {len(self.errors) or '?'} layers, {size} parameters"
        )
        if self.error is not None:
            worst = max(self.errors, key=self.errors.get)
            text += (
                f"; reconstruction error {100 * self.error:.2f} % of the merged update "
                f"(worst layer {worst}: {100 * self.errors[worst]:.2f} %)"
            )
        return text


class AdapterMerge:
    """The merge of ``adapters`` (files or ``AdapterFile``s trained on ``base``) by ``method``.

    ``weights``: one per adapter file, or one per task (an HDMoLE file has one task per domain);
    ``configs``: the experiments' config.yaml of ESPnet model files not next to them; the rest as
    ``ssvd_peft.merging.engine.merge_models``. Inputs are checked when the merge is made.
    """

    def __init__(
        self,
        base: ModelInput,
        adapters: Sequence[AdapterInput],
        method: str,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        vocabulary: Sequence[str] = DEFAULT_VOCABULARY,
        configs: Sequence[str | Path | None] | None = None,
        **knobs: Any,
    ) -> None:
        self.entry = get_merge_method(method)
        self.knobs = self.entry.resolved_knobs(knobs)
        if not adapters:
            raise PeftConfigError("merging needs at least one adapter; the list of adapters is empty")
        configs = list(configs) if configs is not None else [None] * len(adapters)
        if len(configs) != len(adapters):
            raise PeftConfigError(
                f"{len(configs)} configs for {len(adapters)} adapters; give one per adapter"
            )
        self.base = open_source(base, "base")
        self.tasks = [read_task(adapter, config) for adapter, config in zip(adapters, configs, strict=True)]
        self.layers = ordered_union([task.layers for task in self.tasks], self.base)
        self.saved = ordered_union([list(task.saved) for task in self.tasks], self.base, suffix="")
        check_against_base(self.base, self.tasks)
        for task in self.tasks:
            if task.layers:
                first = task.layers[0]
                task.tasks = len(task.deltas(first, self.base.get(f"{first}.weight")))
        self.weights = task_weights(weights, self.tasks)
        self.seed = seed
        self.vocabulary = list(vocabulary)

    def layer_deltas(self, layer: str, weight: torch.Tensor) -> list[torch.Tensor]:
        """delta_t of every task at ``layer`` (float64)."""
        return [delta for task in self.tasks for delta in task.deltas(layer, weight)]

    def layer_update(
        self, layer: str, weight: torch.Tensor, deltas: list[torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """The merged update delta of ``layer`` from its tasks' ``deltas`` (float64)."""
        base = weight.to(MERGE_DTYPE)
        merged = merge_one(
            f"{layer}.weight",
            base,
            [base + delta for delta in deltas],
            self.weights,
            self.entry,
            self.knobs,
            self.vocabulary,
            generator,
        )
        return merged - base

    def saved_tensor(self, name: str, base: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The merge of a saved module's tensor (a task whose file does not save it keeps the base's)."""
        tensors = [task.saved.get(name, base) for task in self.tasks for _ in range(task.tasks)]
        return merge_one(
            name, base, tensors, self.weights, self.entry, self.knobs, self.vocabulary, generator
        )

    def specs(self) -> dict[str, TensorSpec]:
        """{name: dtype and shape} of the merged model: the base's."""
        return {name: self.base.spec(name) for name in self.base}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of the base with the merged update in every adapted layer and the merged
        saved modules, one tensor at a time, in the base's order and dtypes."""
        generator = torch.Generator().manual_seed(self.seed)
        weights = {f"{layer}.weight": layer for layer in self.layers}
        for name in self.base:
            tensor = self.base.get(name)
            if name in weights:
                layer = weights[name]
                update = self.layer_update(layer, tensor, self.layer_deltas(layer, tensor), generator)
                yield name, (tensor.to(MERGE_DTYPE) + update).to(tensor.dtype)
            elif name in self.saved:
                yield name, self.saved_tensor(name, tensor, generator)
            else:
                yield name, tensor
            release_freed_memory()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The merged plain model's state dict."""
        return dict(self.tensors())

    def save(self, output: str | Path) -> Path:
        """Write the merged plain model as it is computed (``.safetensors``, or a torch file as
        ESPnet's), atomically."""
        return write_state_dict(output, self.specs(), self.tensors())

    def adapter(self, form: str | None = None, rank: int | None = None) -> MergedAdapter:
        """The merge kept as an adapter of ``form`` (default ``ssvd_core`` when every input is of the
        SSVD family, else ``lora``); ``rank``: the LoRA form's r' (see the module docstring)."""
        methods = sorted({task.file.method for task in self.tasks})
        form = form or ("ssvd_core" if set(methods) <= set(SUBSPACE_METHODS) else "lora")
        if form not in FORMS:
            raise PeftConfigError(f"a merged adapter is of form {' or '.join(FORMS)}; got {form!r}")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise PeftConfigError(f"rank must be a positive integer, got {rank!r}")
        if form == "ssvd_core":
            if rank is not None:
                raise PeftConfigError("rank belongs to the lora form; the ssvd_core form keeps every k")
            return self.subspace_adapter(methods)
        return self.lora_adapter(rank)

    def lora_adapter(self, rank: int | None) -> MergedAdapter:
        generator = torch.Generator().manual_seed(self.seed)
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        errors: dict[str, float] = {}
        residual = total = 0.0
        for layer in self.layers:
            weight = self.base.get(f"{layer}.weight")
            deltas = self.layer_deltas(layer, weight)
            update = self.layer_update(layer, weight, deltas, generator)
            u, s, vh = torch.linalg.svd(update, full_matrices=False)
            layer_rank = rank or max(1, *(nonzero_rank(torch.linalg.svdvals(d), d.shape) for d in deltas))
            layer_rank = min(layer_rank, len(s))
            root = s[:layer_rank].sqrt()
            prefix = f"{layer}.{ADAPTERS_ATTR}.{DEFAULT_ADAPTER}"
            tensors[f"{prefix}.lora_A"] = (root[:, None] * vh[:layer_rank]).to(weight.dtype)
            tensors[f"{prefix}.lora_B"] = (u[:, :layer_rank] * root[None, :]).to(weight.dtype)
            tensors[f"{layer}.base_fingerprint"] = weight_fingerprint(weight)
            ranks[layer] = layer_rank
            lost, kept = float(s[layer_rank:].pow(2).sum()), float(s.pow(2).sum())
            errors[layer] = math.sqrt(lost / kept) if kept > 0 else 0.0
            residual, total = residual + lost, total + kept
        tensors.update(self.merged_saved_tensors(generator))
        common = max(set(ranks.values()), key=list(ranks.values()).count)
        config = config_from_dict(
            "lora",
            {
                "target_modules": list(self.layers),
                "rank": common,
                "alpha": float(common),
                "module_overrides": {
                    layer: {"rank": r, "alpha": float(r)} for layer, r in ranks.items() if r != common
                },
            },
        )
        file = AdapterFile("lora", config.to_dict(), tensors, modules_to_save=self.modules_to_save())
        return MergedAdapter(file, errors, math.sqrt(residual / total) if total > 0 else 0.0)

    def subspace_adapter(self, methods: list[str]) -> MergedAdapter:
        other = [m for m in methods if m not in SUBSPACE_METHODS]
        if other:
            raise PeftConfigError(
                "the ssvd_core form merges SSVD-family adapters in their shared subspace; "
                f"{', '.join(other)} adapters have no such core: keep the merge as a LoRA (form 'lora') "
                "or fold it into the model"
            )
        generator = torch.Generator().manual_seed(self.seed)
        tensors: dict[str, torch.Tensor] = {}
        sizes: dict[str, int] = {}
        for layer in self.layers:
            weight = self.base.get(f"{layer}.weight")
            cores, values = self.subspace_cores(layer, weight)
            base = torch.diag(values)
            merged = merge_one(
                f"{layer}.weight",
                base,
                [base + core for core in cores],
                self.weights,
                self.entry,
                self.knobs,
                self.vocabulary,
                generator,
            )
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            tensors[f"{layer}.{ADAPTERS_ATTR}.{DEFAULT_ADAPTER}.ssvd_core"] = (merged - base).to(dtype)
            tensors[f"{layer}.base_fingerprint"] = weight_fingerprint(weight)
            sizes[layer] = len(values)
        tensors.update(self.merged_saved_tensors(generator))
        first = self.tasks[0].config
        options = {
            "target_modules": list(self.layers),
            "k": getattr(first, "k", None),
            "k_ratio": getattr(first, "k_ratio", 0.4),
            "k_floor": bool(getattr(first, "espnet_compat", False) or getattr(first, "k_floor", False)),
        }
        config = config_from_dict("ssvd_core", options)
        overrides = {
            layer: {"k": k}
            for layer, k in sizes.items()
            if config.subspace_size(*reversed(tuple(self.base.get(f"{layer}.weight").shape))) != k
        }
        config = config_from_dict("ssvd_core", {**options, "module_overrides": overrides})
        file = AdapterFile("ssvd_core", config.to_dict(), tensors, modules_to_save=self.modules_to_save())
        return MergedAdapter(file, {layer: 0.0 for layer in self.layers})

    def subspace_cores(self, layer: str, weight: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every task's k x k core at ``layer`` and s_k; every input must adapt it with one k."""
        cores, sizes, values = [], {}, None
        for task in self.tasks:
            if layer not in task.layers:
                sizes[task.label] = None
                continue
            adapter, _ = task.layer_adapter(layer, weight)
            with torch.no_grad():
                cores.append(adapter.core_matrix().to(MERGE_DTYPE))
            sizes[task.label] = adapter.k
            values = adapter.singular_values.to(MERGE_DTYPE)
        if len(set(sizes.values())) != 1:
            listed = ", ".join(
                f"{label}: {'not adapted' if k is None else f'k={k}'}" for label, k in sizes.items()
            )
            raise PeftConfigError(
                f"the ssvd_core form needs every adapter to adapt {layer} with one subspace size k "
                f"({listed}); keep the merge as a LoRA (form 'lora') or fold it into the model"
            )
        return cores, values

    def merged_saved_tensors(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {name: self.saved_tensor(name, self.base.get(name), generator) for name in self.saved}

    def modules_to_save(self) -> list[str]:
        return list(dict.fromkeys(pattern for task in self.tasks for pattern in task.file.modules_to_save))


def read_task(adapter: AdapterInput, config_file: str | Path | None) -> AdapterTask:
    """An ``AdapterTask`` from a file (or an ``AdapterFile``) and its config."""
    if isinstance(adapter, AdapterFile):
        file, label = adapter, f"{adapter.method} adapter"
    else:
        file, label = read_adapter_file(adapter, config_file), str(adapter)
    config = config_from_dict(file.method, file.config)
    state, _ = split_fingerprints(file.tensors)
    marker = f".{ADAPTERS_ATTR}."
    layers = list(dict.fromkeys(key.split(marker)[0] for key in state if marker in key))
    saved = {
        key: value
        for key, value in state.items()
        if marker not in key and not key.startswith(f"{ADAPTERS_ATTR}.")
    }
    return AdapterTask(file, config, label, layers, saved)


def task_weights(weights: Sequence[float] | None, tasks: list[AdapterTask]) -> list[float]:
    """One weight per task: the given per-task weights, or each file's weight for all its tasks."""
    count = sum(task.tasks for task in tasks)
    if weights is None:
        return [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) == count:
        return weights
    if len(weights) == len(tasks):
        return [w for w, task in zip(weights, tasks, strict=True) for _ in range(task.tasks)]
    raise PeftConfigError(
        f"{len(weights)} weights for {len(tasks)} adapters ({count} tasks: an HDMoLE adapter has one per "
        "domain); give one weight per adapter or one per task"
    )


def ordered_union(names: list[list[str]], base: TensorSource, suffix: str = ".weight") -> list[str]:
    """The names of every list, in the base model's order (a name the base lacks is refused later)."""
    wanted = set().union(*map(set, names))
    order = {name: i for i, name in enumerate(base.keys())}
    return sorted(wanted, key=lambda name: order.get(f"{name}{suffix}", len(order)))


def check_against_base(base: TensorSource, tasks: list[AdapterTask]) -> None:
    """Refuse an adapter whose layers or saved modules the base lacks, or of another base model."""
    keys = set(base.keys())
    for task in tasks:
        for layer in task.layers:
            if f"{layer}.weight" not in keys:
                raise AdapterCheckpointError(
                    f"adapter {task.label!r} adapts {layer}, which the base model has not: it was trained "
                    "on another model; merge adapters of this base model"
                )
            expected = task.file.fingerprints.get(layer)
            if expected is None:
                continue
            actual = weight_fingerprint(base.get(f"{layer}.weight"))
            if not torch.allclose(actual, expected.to(torch.float64), rtol=FINGERPRINT_RTOL, atol=1e-6):
                raise AdapterCheckpointError(
                    f"adapter {task.label!r} was trained on another base model: the weight of {layer} "
                    "differs from the one it was trained on. Give the pretrained model it was trained from"
                )
        for name, tensor in task.saved.items():
            if name not in keys or base.get(name).shape != tensor.shape:
                raise AdapterCheckpointError(
                    f"adapter {task.label!r} saves {name} {tuple(tensor.shape)}, which the base model has "
                    "not (or of another shape); merge adapters of this base model"
                )
