"""Adapter-only model files in ESPnet's own format: ESPnet's flat state dict holding the entries
of ``ssvd_peft.adapter_state``'s layout (the same entries ``save_adapter`` writes).

ESPnet's trainer saves ``model.state_dict()`` as ``Nepoch.pth`` (and links ``*.best.pth``,
averages n-best files, stores it in ``checkpoint.pth``). With ``keep_adapter_entries`` the
state dict of a model that has adapters holds only the adapter entries, the modules_to_save and
the base fingerprints, so every ESPnet tool keeps working on files a small fraction of the
model's size, and ``ssvd_peft.checkpoint.load_adapter`` opens them in plain PyTorch (with the
experiment's config.yaml). A model without adapters (after ``merge_and_unload``) gives its full
state dict again. ``read_model_file`` reads a model file with one clear error for a missing or
unreadable one.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ssvd_peft.adapter_state import AdapterCheckpointError, adapter_fingerprints, select_adapter_entries
from ssvd_peft.inject import iter_adapter_layers


def keep_adapter_entries(
    model: nn.Module, modules_to_save: list[str], always: bool = False
) -> RemovableHandle:
    """Make ``model.state_dict()`` hold only the adapter entries (and ``modules_to_save``) while the
    model has adapters; with ``always``, also without adapters (a feature-fusion model: its head and
    trained modules)."""
    return model.register_state_dict_post_hook(
        partial(_adapter_entries_only, modules_to_save=modules_to_save, always=always)
    )


def read_model_file(path: str | Path, role: str, weights_only: bool = True) -> dict[str, Any]:
    """The contents of an ESPnet model file (its ``module`` entry for a wrapped one), or one error
    that names the file and its ``role`` (the option it came from) when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise AdapterCheckpointError(f"{role} {str(path)!r} does not exist; check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:
        raise AdapterCheckpointError(
            f"{role} {str(path)!r} is not a readable model file ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no details'}); it is damaged (a failed "
            "copy or write) or not a file that ESPnet training wrote: give a *.pth of the experiment"
        ) from None
    if not isinstance(state, dict):
        raise AdapterCheckpointError(
            f"{role} {str(path)!r} holds a {type(state).__name__}, not a state dict; give a *.pth "
            "that ESPnet training wrote"
        )
    return state.get("module", state)


def _adapter_entries_only(
    model: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    _metadata: Any,
    modules_to_save: list[str],
    always: bool,
) -> None:
    if not always and not any(True for _ in iter_adapter_layers(model)):
        return
    own = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    kept = select_adapter_entries(own, modules_to_save)
    for key in own:
        if key not in kept:
            del state_dict[f"{prefix}{key}"]
    for key, fingerprint in adapter_fingerprints(model).items():
        state_dict[f"{prefix}{key}"] = fingerprint
