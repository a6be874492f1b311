"""Merging whole models, one named tensor at a time.

    merged = merge_models("base.pth", ["accent.pth", "child.pth"], "ties", density=0.3, scaling=0.8)
    merge_models_to_file("base.pth", [...], "merged.safetensors", "tsv_m")

Each model is read on demand (``sources``) and the merged model written as it is computed
(``sinks``): one tensor of every model is in memory at a time (the tensors that take the mean are
read one model at a time), so peak memory does not grow with the models' size or number beyond
that. Tensor rules, per name:

- a tensor equal in every model (and the base) is taken as it is (frozen: tau = 0);
- a tensor that is not floating point (a counter) is the base's (the first model's without a base);
- a normalisation layer's running statistics (``running_mean``, ``running_var``: estimates of the
  data, not weights) take the mean of the task vectors whatever the method, so they stay estimates
  between the models' (task arithmetic at lambda T > 1 would push a variance below zero);
- a vocabulary matrix (``vocabulary`` patterns, full names; default ESPnet's decoder.embed,
  decoder.output_layer and ctc.ctc_lo) takes the mean of the task vectors, as does every tensor that
  is not a 2-D weight for a method that works through singular vectors: theta_0 + sum_t w_t tau_t /
  sum_t w_t (without a base: the weighted mean of the models);
- every other tensor goes to the method.

Computation is in float32 (float64 for float64 tensors); each result is cast back to the stored
dtype. Randomness (DARE) comes from one generator seeded with ``seed``, so a merge is reproducible.
Models whose names or shapes differ are refused with the first difference named, and so is a model
that is not a fine-tune of the base: one whose change to a weight of at least ``FINGERPRINT_SIZE``
entries is larger than ``max_change`` times that weight (default 1; two unrelated models of one
architecture differ by about sqrt(2) times, a fine-tune by a few percent).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.merging.memory import release_freed_memory
from ssvd_peft.merging.ops import weighted_sum, working_dtype
from ssvd_peft.merging.registry import MergeMethod, get_merge_method
from ssvd_peft.merging.sinks import write_state_dict
from ssvd_peft.merging.sources import TensorSource, TensorSpec, open_source
from ssvd_peft.targets import matches_any

ModelInput = str | Path | Mapping[str, torch.Tensor]
DEFAULT_VOCABULARY = (r"decoder\.embed\..*", r"decoder\.output_layer\..*", r"ctc\.ctc_lo\..*")
RUNNING_STATISTICS = (".running_mean", ".running_var")
FINGERPRINT_SIZE = 1024


class ModelMerge:
    """The merge of ``models`` (onto ``base``) by ``method``; checked when made, computed as read.

    ``weights``: one per model (default 1); ``seed``: DARE's generator; ``vocabulary``: full-name
    patterns of the vocabulary matrices; ``max_change``: the fine-tune check (None: off).
    """

    def __init__(
        self,
        base: ModelInput | None,
        models: Sequence[ModelInput],
        method: str,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        vocabulary: Sequence[str] = DEFAULT_VOCABULARY,
        max_change: float | None = 1.0,
        **knobs: Any,
    ) -> None:
        self.entry = get_merge_method(method)
        self.knobs = self.entry.resolved_knobs(knobs)
        if not models:
            raise PeftConfigError("merging needs at least one model; the list of models is empty")
        if self.entry.needs_base and base is None:
            raise PeftConfigError(f"merge method {method!r} works on task vectors and needs the base model")
        self.weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(models):
            raise PeftConfigError(
                f"{len(self.weights)} weights for {len(models)} models; give one weight per model"
            )
        self.sources = [open_source(model, f"model {i + 1}") for i, model in enumerate(models)]
        self.base = None if base is None else open_source(base, "base")
        self.reference = self.base if self.base is not None else self.sources[0]
        self.names = check_same_names(self.base, self.sources)
        self.seed = seed
        self.vocabulary = list(vocabulary)
        self.max_change = max_change

    def specs(self) -> dict[str, TensorSpec]:
        """{name: dtype and shape} of the merged model (the base's, or the first model's)."""
        return {name: self.reference.spec(name) for name in self.names}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged tensor) for every tensor, in the models' order (see the module docstring)."""
        generator = torch.Generator().manual_seed(self.seed)
        for name in self.names:
            yield name, self.merged(name, generator)
            release_freed_memory()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors())

    def save(self, output: str | Path) -> Path:
        """Write the merged model to ``output`` as it is computed (``.safetensors``, or a torch file
        as ESPnet's model files are), atomically: nothing is left behind if the merge fails."""
        return write_state_dict(output, self.specs(), self.tensors())

    def merged(self, name: str, generator: torch.Generator) -> torch.Tensor:
        spec = self.reference.spec(name)
        for source in self.sources:
            if source.spec(name).shape != spec.shape:
                raise PeftConfigError(
                    f"{name}: {source.name} has shape {source.spec(name).shape}, {self.reference.name} "
                    f"{spec.shape}; the models are not fine-tunes of one architecture"
                )
        if not spec.dtype.is_floating_point:
            return self.reference.get(name)
        if takes_mean(name, len(spec.shape), self.entry, self.vocabulary):
            return self.streamed_mean(name)
        reference = self.reference.get(name)
        dtype = working_dtype(reference)
        models = torch.empty((len(self.sources), *spec.shape), dtype=dtype)
        unchanged = True
        for row, source in zip(models, self.sources, strict=True):
            tensor = source.get(name)
            if self.base is not None and self.max_change is not None:
                check_fine_tunes(name, reference, [tensor], [source], self.max_change)
            unchanged = unchanged and torch.equal(tensor, reference)
            row.copy_(tensor)
            del tensor
        if unchanged:
            return reference
        base = None if self.base is None else reference.to(dtype)
        merged = merge_stack(
            name, base, models, self.weights, self.entry, self.knobs, self.vocabulary, generator
        )
        return merged.to(reference.dtype)

    def streamed_mean(self, name: str) -> torch.Tensor:
        """The weighted mean of the models' tensors (theta_0 + the mean task vector), reading one
        model's tensor at a time; the reference tensor itself when every model holds it unchanged."""
        reference = self.reference.get(name)
        total = sum(self.weights)
        dtype = working_dtype(reference)
        mean, unchanged = torch.zeros(reference.shape, dtype=dtype), True
        for weight, source in zip(self.weights, self.sources, strict=True):
            tensor = source.get(name)
            if self.base is not None and self.max_change is not None:
                check_fine_tunes(name, reference, [tensor], [source], self.max_change)
            unchanged = unchanged and torch.equal(tensor, reference)
            mean.add_(tensor.to(dtype), alpha=weight / total)
        return reference if unchanged else mean.to(reference.dtype)


def takes_mean(name: str, ndim: int, entry: MergeMethod, vocabulary: Sequence[str]) -> bool:
    """The tensor rule: running statistics, vocabulary matrices, and every tensor but 2-D weights
    for a method that works through singular vectors, take the mean of the task vectors."""
    if name.endswith(RUNNING_STATISTICS):
        return True
    return matches_any(list(vocabulary), name) or (entry.subspace and ndim != 2)


def merge_tensors(
    base: ModelInput | None,
    models: Sequence[ModelInput],
    method: str,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    vocabulary: Sequence[str] = DEFAULT_VOCABULARY,
    max_change: float | None = 1.0,
    **knobs: Any,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged tensor) for every tensor of the models, in their order (see the module doc)."""
    return ModelMerge(base, models, method, weights, seed, vocabulary, max_change, **knobs).tensors()


def merge_one(
    name: str,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    weights: list[float],
    entry: MergeMethod,
    knobs: dict[str, Any],
    vocabulary: Sequence[str],
    generator: torch.Generator,
) -> torch.Tensor:
    """One tensor, given every model's, by the rules of the module docstring, in its stored dtype."""
    reference = tensors[0] if base is None else base
    if not reference.is_floating_point() or all(torch.equal(t, reference) for t in tensors):
        return reference.clone()
    dtype = working_dtype(reference)
    models = torch.stack([tensor.to(dtype) for tensor in tensors])
    working_base = None if base is None else base.to(dtype)
    merged = merge_stack(name, working_base, models, weights, entry, knobs, vocabulary, generator)
    return merged.to(reference.dtype)


def merge_stack(
    name: str,
    base: torch.Tensor | None,
    models: torch.Tensor,
    weights: list[float],
    entry: MergeMethod,
    knobs: dict[str, Any],
    vocabulary: Sequence[str],
    generator: torch.Generator,
) -> torch.Tensor:
    """The merge of the stacked models (T, ...) in the working dtype (the method may overwrite the
    stack): the weighted mean where the tensor rules say so, else the method."""
    w = torch.tensor(weights, dtype=models.dtype)
    if takes_mean(name, models.dim() - 1, entry, vocabulary):
        return weighted_sum(w / w.sum(), models)
    return entry.function(base, models, w, generator=generator, **knobs)


def merge_models(
    base: ModelInput | None,
    models: Sequence[ModelInput],
    method: str,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    vocabulary: Sequence[str] = DEFAULT_VOCABULARY,
    max_change: float | None = 1.0,
    **knobs: Any,
) -> dict[str, torch.Tensor]:
    """The merged state dict (see the module docstring)."""
    return ModelMerge(base, models, method, weights, seed, vocabulary, max_change, **knobs).state_dict()


def merge_models_to_file(
    base: ModelInput | None,
    models: Sequence[ModelInput],
    output: str | Path,
    method: str,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    vocabulary: Sequence[str] = DEFAULT_VOCABULARY,
    max_change: float | None = 1.0,
    **knobs: Any,
) -> Path:
    """Merge into ``output`` tensor by tensor (``ModelMerge.save``)."""
    return ModelMerge(base, models, method, weights, seed, vocabulary, max_change, **knobs).save(output)


def check_same_names(base: TensorSource | None, sources: list[TensorSource]) -> list[str]:
    """The tensor names every model (and the base) has; the first difference is an error."""
    reference = base if base is not None else sources[0]
    names = reference.keys()
    for source in [s for s in sources if s is not reference]:
        missing = sorted(set(names) - set(source.keys()))
        extra = sorted(set(source.keys()) - set(names))
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which {reference.name} has not"
            raise PeftConfigError(
                f"{source.name} {what} ({len(missing)} missing, {len(extra)} extra): the models are not "
                f"fine-tunes of one architecture; merge models of the same base model"
            )
    return names


def check_fine_tunes(
    name: str, base: torch.Tensor, tensors: list[torch.Tensor], sources: list[TensorSource], max_change: float
) -> None:
    """Refuse a model whose task vector of this weight exceeds ``max_change`` times the weight."""
    if not base.is_floating_point() or base.dim() < 2 or base.numel() < FINGERPRINT_SIZE:
        return
    reference = base.to(working_dtype(base))
    size = float(reference.norm())
    if size == 0.0:
        return
    for tensor, source in zip(tensors, sources, strict=True):
        change = float((tensor.to(reference.dtype) - reference).norm())
        if change > max_change * size:
            raise PeftConfigError(
                f"{source.name} is not a fine-tune of the base: its {name} differs from the base's by "
                f"{change / size:.2f} times the base weight (a fine-tune moves it by a few percent). "
                "Merge models fine-tuned from this base, or raise max_change if this is intended"
            )
