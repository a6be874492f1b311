"""Merging fine-tuned models and adapters, tensor by tensor.

``registry``: the merge methods by name; ``parameter_space``, ``task_space``, ``subspace``: the
methods (importing this package registers them); ``ops``: the operations they share.
"""

from ssvd_peft.merging import parameter_space, subspace, task_space
from ssvd_peft.merging.registry import MergeMethod, get_merge_method, merge_method, merge_method_names

__all__ = [
    "MergeMethod",
    "get_merge_method",
    "merge_method",
    "merge_method_names",
    "parameter_space",
    "subspace",
    "task_space",
]
