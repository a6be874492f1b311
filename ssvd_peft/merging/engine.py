"""Merging whole models, one named tensor at a time.

    merged = merge_models("base.pth", ["accent.pth", "child.pth"], "ties", density=0.3, scaling=0.8)
    merge_models_to_file("base.pth", [...], "merged.safetensors", "tsv_m")

Each model is read on demand (``sources``): one tensor of every model is in memory at a time,
besides the merged model being built. Tensor rules, per name:

- a tensor equal in every model (and the base) is taken as it is (frozen: tau = 0);
- a tensor that is not floating point (a counter) is the base's (the first model's without a base);
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
from safetensors.torch import save_file

from ssvd_peft.errors import PeftConfigError
from ssvd_peft.files import atomic_write
from ssvd_peft.merging.ops import normalised_weights, working_dtype
from ssvd_peft.merging.registry import MergeMethod, get_merge_method
from ssvd_peft.merging.sources import TensorSource, open_source
from ssvd_peft.targets import matches_any

ModelInput = str | Path | Mapping[str, torch.Tensor]
DEFAULT_VOCABULARY = (r"decoder\.embed\..*", r"decoder\.output_layer\..*", r"ctc\.ctc_lo\..*")
FINGERPRINT_SIZE = 1024


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
    entry = get_merge_method(method)
    resolved = entry.resolved_knobs(knobs)
    if not models:
        raise PeftConfigError("merging needs at least one model; the list of models is empty")
    if entry.needs_base and base is None:
        raise PeftConfigError(f"merge method {method!r} works on task vectors and needs the base model")
    weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models):
        raise PeftConfigError(f"{len(weights)} weights for {len(models)} models; give one weight per model")
    sources = [open_source(model, f"model {i + 1}") for i, model in enumerate(models)]
    base_source = None if base is None else open_source(base, "base")
    names = check_same_names(base_source, sources)
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        tensors = [source.get(name) for source in sources]
        base_tensor = None if base_source is None else base_source.get(name)
        check_same_shapes(name, base_tensor, tensors, base_source, sources)
        if base_tensor is not None and max_change is not None:
            check_fine_tunes(name, base_tensor, tensors, sources, max_change)
        merged = merge_one(name, base_tensor, tensors, weights, entry, resolved, vocabulary, generator)
        yield name, merged


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
    """One tensor by the rules of the module docstring, in its stored dtype."""
    reference = tensors[0] if base is None else base
    if not reference.is_floating_point() or all(torch.equal(t, reference) for t in tensors):
        return reference.clone()
    if matches_any(list(vocabulary), name) or (entry.subspace and reference.dim() != 2):
        merged = mean_of_task_vectors(base, tensors, weights)
    else:
        merged = entry.function(base, tensors, weights, generator=generator, **knobs)
    return merged.to(reference.dtype)


def mean_of_task_vectors(
    base: torch.Tensor | None, tensors: list[torch.Tensor], weights: list[float]
) -> torch.Tensor:
    """theta_0 + sum_t w_t tau_t / sum_t w_t, which is the weighted mean of the models (with or
    without a base: the base cancels)."""
    dtype = working_dtype(tensors[0])
    stacked = torch.stack([t.to(dtype) for t in tensors])
    return torch.einsum("t,t...->...", normalised_weights(weights, stacked), stacked)


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
    return dict(merge_tensors(base, models, method, weights, seed, vocabulary, max_change, **knobs))


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
    """Merge and write the state dict to ``output`` (``.safetensors``: safetensors; otherwise a torch
    file, as ESPnet's model files are), atomically: nothing is left behind if the merge fails."""
    merged = merge_models(base, models, method, weights, seed, vocabulary, max_change, **knobs)
    if Path(output).suffix == ".safetensors":
        contiguous = {key: value.contiguous() for key, value in merged.items()}
        return atomic_write(output, lambda temporary: save_file(contiguous, temporary))
    return atomic_write(output, lambda temporary: torch.save(merged, temporary))


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


def check_same_shapes(
    name: str,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    base_source: TensorSource | None,
    sources: list[TensorSource],
) -> None:
    reference = tensors[0] if base is None else base
    origin = sources[0] if base is None else base_source
    for tensor, source in zip(tensors, sources, strict=True):
        if tensor.shape != reference.shape:
            raise PeftConfigError(
                f"{name}: {source.name} has shape {tuple(tensor.shape)}, {origin.name} "
                f"{tuple(reference.shape)}; the models are not fine-tunes of one architecture"
            )


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
