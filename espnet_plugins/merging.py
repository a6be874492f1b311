"""Merging ESPnet experiments: per-domain fine-tunes (full, or adapters of any method) of one
pretrained model into one ordinary ESPnet model that stock inference decodes.

    merge_experiments(PeftASRTask, "exp/asr_base", ["exp/accent", "exp/child"], "exp/merged_ties",
                      "ties", knobs={"density": 0.3})

An experiment directory holds its ``config.yaml`` and model files; the model file is the one
named, or the first of ``MODEL_FILES`` that exists. The base directory is the pretrained model's.
Experiments whose config has a peft block are adapters (merged through their dense updates,
``ssvd_peft.merging.adapters``; adapter-only and full model files alike), the others full
fine-tunes (merged tensor by tensor, ``ssvd_peft.merging.engine``); one merge takes one kind.

The output directory gets ``config.yaml`` (the base's config without any peft block; the merged
state dict is checked against the stock task's model built from it), ``model.pth`` and
``merge.yaml`` (what was merged, how, and with ``search`` the grid and the choice). The model is
written as it is merged, tensor by tensor.

``as_adapter`` (``lora``, ``ssvd_core`` or ``auto``; adapter inputs only) keeps the merge as an
adapter instead (``AdapterMerge.adapter``; ``rank``: the LoRA form's rank): the output directory is
then an adapter experiment of the base, ``config.yaml`` = the base's config with a peft block
(``peft_pretrained`` = the base's model file) and ``model.pth`` the adapter-only model file, which
the plugin's inference decodes (``--peft_merge true`` folds it) and ``load_adapter`` opens;
``merge.yaml`` adds the form and, for the LoRA form, its reconstruction error.

``search``: {knob: [values]} tried on dev data before anything is written: each point of the grid
is merged in memory and scored by the model's token accuracy on ``dev_data`` (the loss when the
model has no attention decoder: higher -loss is better), in the form that is written (a kept
adapter is scored as that adapter on the base); the best point is written, and the grid with every
score goes into ``merge.yaml``. Test data is for after the choice.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from espnet2.utils.yaml_no_alias_safe_dump import yaml_no_alias_safe_dump

from espnet_plugins.export import CONFIG_FILE, MODEL_FILE, check_stock_keys
from espnet_plugins.options import without_peft_options
from espnet_plugins.state import read_model_file
from ssvd_peft.checkpoint import load_adapter
from ssvd_peft.errors import PeftConfigError
from ssvd_peft.files import atomic_write
from ssvd_peft.inject import unload
from ssvd_peft.merging.adapters import FORMS, AdapterMerge, MergedAdapter
from ssvd_peft.merging.engine import ModelMerge
from ssvd_peft.merging.registry import get_merge_method

logger = logging.getLogger(__name__)

MODEL_FILES = (
    "valid.acc.ave.pth",
    "valid.acc.best.pth",
    "valid.loss.ave.pth",
    "valid.loss.best.pth",
    MODEL_FILE,
)
RECORD_FILE = "merge.yaml"
AUTO_FORM = "auto"


@dataclass
class Experiment:
    """An ESPnet experiment directory: its training config and the model file to merge."""

    directory: Path
    config: dict[str, Any]
    model_file: Path

    @property
    def is_adapter(self) -> bool:
        return bool(self.config.get("peft"))


def read_experiment(directory: str | Path, model_file: str | None = None) -> Experiment:
    """The experiment in ``directory``; one message for a missing directory, config or model file."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise PeftConfigError(
            f"{str(directory)!r} is not an ESPnet experiment directory: it has no {CONFIG_FILE}"
        )
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    names = [model_file] if model_file else list(MODEL_FILES)
    found = next((directory / name for name in names if (directory / name).is_file()), None)
    if found is None:
        present = sorted(path.name for path in directory.glob("*.pth"))
        raise PeftConfigError(
            f"{str(directory)!r} has no model file {' or '.join(names)} (it has {present or 'none'}); "
            "name one with --model_file"
        )
    return Experiment(directory, config, found)


@dataclass
class MergeRequest:
    """One merge of ESPnet experiments (see the module docstring)."""

    base: Experiment
    experiments: list[Experiment]
    method: str
    knobs: dict[str, Any]
    weights: list[float] | None = None
    seed: int = 0
    as_adapter: str | None = None
    rank: int | None = None

    def check(self) -> None:
        get_merge_method(self.method).resolved_knobs(self.knobs)
        if self.as_adapter is not None and self.as_adapter not in (*FORMS, AUTO_FORM):
            raise PeftConfigError(
                f"as_adapter is one of {', '.join((*FORMS, AUTO_FORM))}; got {self.as_adapter!r}"
            )
        if self.rank is not None and self.as_adapter is None:
            raise PeftConfigError("rank is the rank of a merge kept as a LoRA: give as_adapter lora too")
        if not self.experiments:
            raise PeftConfigError(
                "merging needs at least one experiment; the list of experiment dirs is empty"
            )
        if self.base.is_adapter:
            raise PeftConfigError(
                f"the base {str(self.base.directory)!r} is an adapter experiment; give the directory of "
                "the pretrained model the experiments started from"
            )
        kinds = {experiment.is_adapter for experiment in self.experiments}
        if len(kinds) > 1:
            adapters = [str(e.directory) for e in self.experiments if e.is_adapter]
            raise PeftConfigError(
                f"the experiments mix adapters ({', '.join(adapters)}) and full fine-tunes; merge each kind "
                "on its own, or fold the adapters first (espnet_plugins.bin.export_merged)"
            )
        if self.as_adapter is not None and kinds != {True}:
            raise PeftConfigError(
                "as_adapter keeps a merge of adapters as an adapter; these experiments are full "
                "fine-tunes: leave it out to write a merged model"
            )

    def kept_adapter(self, knobs: dict[str, Any]) -> MergedAdapter:
        """The merge with ``knobs`` kept as an adapter of the requested form."""
        form = None if self.as_adapter == AUTO_FORM else self.as_adapter
        return self.merge(knobs).adapter(form, self.rank)

    def merge(self, knobs: dict[str, Any]) -> ModelMerge | AdapterMerge:
        """The merge with ``knobs``: ``specs()``, ``state_dict()``, ``save(path)``."""
        files = [experiment.model_file for experiment in self.experiments]
        if self.experiments[0].is_adapter:
            configs = [experiment.directory / CONFIG_FILE for experiment in self.experiments]
            return AdapterMerge(
                self.base.model_file, files, self.method, self.weights, self.seed, configs=configs, **knobs
            )
        return ModelMerge(self.base.model_file, files, self.method, self.weights, self.seed, **knobs)

    def record(self, knobs: dict[str, Any]) -> dict[str, Any]:
        return {
            "method": self.method,
            "knobs": get_merge_method(self.method).resolved_knobs(knobs),
            "seed": self.seed,
            "weights": self.weights,
            "base": str(self.base.model_file),
            "experiments": [str(experiment.model_file) for experiment in self.experiments],
            "kind": "adapters" if self.experiments[0].is_adapter else "full fine-tunes",
        }


def merge_experiments(
    task: type[Any],
    base_dir: str | Path,
    exp_dirs: Sequence[str | Path],
    output_dir: str | Path,
    method: str,
    knobs: dict[str, Any] | None = None,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    model_file: str | None = None,
    base_model_file: str | None = None,
    search: dict[str, list[Any]] | None = None,
    dev_data: Sequence[str] | None = None,
    as_adapter: str | None = None,
    rank: int | None = None,
) -> Path:
    """Merge and write an ESPnet model directory (see the module docstring); its path."""
    request = MergeRequest(
        read_experiment(base_dir, base_model_file),
        [read_experiment(directory, model_file) for directory in exp_dirs],
        method,
        dict(knobs or {}),
        None if weights is None else [float(w) for w in weights],
        seed,
        as_adapter,
        rank,
    )
    request.check()
    config = without_peft_options(request.base.config)
    record: dict[str, Any] = {}
    chosen = dict(request.knobs)
    if search:
        if not dev_data:
            raise PeftConfigError("search scores each grid point on dev data: give --dev_data")
        grid = search_grid(task, request, config, search, list(dev_data))
        best = max(grid, key=lambda row: row["score"])
        chosen = {**request.knobs, **best["knobs"]}
        record["search"] = {
            "metric": best["metric"],
            "dev_data": list(dev_data),
            "grid": grid,
            "chosen": best,
        }
    start = time.perf_counter()
    output_dir = Path(output_dir)
    if request.as_adapter is None:
        merge = request.merge(chosen)
        check_stock_keys(task, config, merge.specs())
        output_dir.mkdir(parents=True, exist_ok=True)
        merge.save(output_dir / MODEL_FILE)
        kept: dict[str, Any] = {}
    else:
        merged = request.kept_adapter(chosen)
        config = adapter_experiment_config(request.base, config, merged)
        output_dir.mkdir(parents=True, exist_ok=True)
        save_model_file(merged.file.tensors, output_dir / MODEL_FILE)
        kept = {"kept_as": {"form": merged.file.method, "rank": request.rank}}
        if merged.error is not None:
            kept["kept_as"]["reconstruction_error"] = round(merged.error, 6)
    record = {**request.record(chosen), **kept, "seconds": round(time.perf_counter() - start, 2), **record}
    write_yaml(output_dir / CONFIG_FILE, config)
    write_yaml(output_dir / RECORD_FILE, record)
    logger.info("Wrote the merged model to %s", output_dir)
    return output_dir


def adapter_experiment_config(
    base: Experiment, config: dict[str, Any], merged: MergedAdapter
) -> dict[str, Any]:
    """The config.yaml of a merge kept as an adapter: the base's config (``config``) and a peft
    block on top of the base's model file."""
    block: dict[str, Any] = {
        "peft": merged.file.method,
        "peft_conf": merged.file.config,
        "peft_pretrained": str(base.model_file.resolve()),
        "peft_save": "adapter",
    }
    if merged.file.modules_to_save:
        block["peft_modules_to_save"] = list(merged.file.modules_to_save)
    return {**config, **block}


def save_model_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """An ESPnet model file (a flat state dict), written atomically."""
    atomic_write(path, lambda temporary: torch.save(tensors, temporary))


def write_yaml(path: Path, values: dict[str, Any]) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as f:
            yaml_no_alias_safe_dump(values, f, indent=4, sort_keys=False)

    atomic_write(path, write)


def search_grid(
    task: type[Any],
    request: MergeRequest,
    config: dict[str, Any],
    search: dict[str, list[Any]],
    dev_data: list[str],
) -> list[dict[str, Any]]:
    """Every point of the grid with its dev score, in grid order."""
    get_merge_method(request.method).resolved_knobs({key: values[0] for key, values in search.items()})
    args = argparse.Namespace(**config)
    model = task.build_model(args)
    model.eval()
    if request.as_adapter is not None:
        model.load_state_dict(read_model_file(request.base.model_file, "the base model file"))
    rows = []
    for values in itertools.product(*search.values()):
        point = dict(zip(search, values, strict=True))
        knobs = {**request.knobs, **point}
        if request.as_adapter is None:
            model.load_state_dict(request.merge(knobs).state_dict())
            metric, score = dev_score(task, model, args, dev_data)
        else:
            load_adapter(model, request.kept_adapter(knobs).file)
            model.eval()
            metric, score = dev_score(task, model, args, dev_data)
            unload(model)
        rows.append({"knobs": point, "metric": metric, "score": round(score, 6)})
        logger.info("search %s: dev %s %.4f", point, metric, score)
    return rows


@torch.no_grad()
def dev_score(
    task: type[Any], model: Any, args: argparse.Namespace, dev_data: list[str]
) -> tuple[str, float]:
    """("acc", token accuracy) over ``dev_data`` (ESPnet's path,name,type triples), weighted by
    tokens; ("-loss", minus the mean loss) when the model reports no accuracy."""
    triples = [tuple(item.split(",")) for item in dev_data]
    iterator = task.build_streaming_iterator(
        data_path_and_name_and_type=triples,
        dtype="float32",
        batch_size=8,
        key_file=None,
        num_workers=0,
        preprocess_fn=task.build_preprocess_fn(args, False),
        collate_fn=task.build_collate_fn(args, False),
        inference=False,
    )
    correct = losses = tokens = 0.0
    has_accuracy = True
    for _, batch in iterator:
        _, stats, _ = model(**batch)
        count = float(batch["text_lengths"].sum())
        accuracy = stats.get("acc")
        has_accuracy = has_accuracy and accuracy is not None
        correct += float(accuracy) * count if accuracy is not None else 0.0
        losses += float(stats["loss"]) * count
        tokens += count
    if tokens == 0:
        raise PeftConfigError(f"the dev data {dev_data} holds no utterances")
    return ("acc", correct / tokens) if has_accuracy else ("-loss", -losses / tokens)


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``knob=v1,v2,...`` items as {knob: [values]} (values read as YAML scalars)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, separator, values = item.partition("=")
        if not separator or not key or not values:
            raise PeftConfigError(f"--search takes KNOB=V1,V2,...; got {item!r}")
        grid[key.strip()] = [yaml.safe_load(value) for value in values.split(",")]
    return grid


def parse_knobs(items: Sequence[str]) -> dict[str, Any]:
    """``knob=value`` items as a dict (values read as YAML scalars)."""
    knobs: dict[str, Any] = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise PeftConfigError(f"--knob takes KNOB=VALUE; got {item!r}")
        knobs[key.strip()] = yaml.safe_load(value)
    return knobs
