"""Merging fine-tuned models and adapters, tensor by tensor.

``engine``: whole models (``merge_models``, ``merge_models_to_file``); ``adapters``: adapters of any
method through their dense updates (``AdapterMerge``); ``registry``: the merge methods by name;
``parameter_space``, ``task_space``, ``subspace``: the methods (importing this package registers
them); ``ops``: the operations they share; ``sources``: reading models tensor by tensor.
"""

from ssvd_peft.merging import parameter_space, subspace, task_space
from ssvd_peft.merging.adapters import AdapterMerge, MergedAdapter
from ssvd_peft.merging.engine import merge_models, merge_models_to_file, merge_tensors
from ssvd_peft.merging.registry import MergeMethod, get_merge_method, merge_method, merge_method_names

__all__ = [
    "AdapterMerge",
    "MergeMethod",
    "MergedAdapter",
    "get_merge_method",
    "merge_method",
    "merge_method_names",
    "merge_models",
    "merge_models_to_file",
    "merge_tensors",
    "parameter_space",
    "subspace",
    "task_space",
]
