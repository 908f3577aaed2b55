"""Merge methods: the method interface, the registry, the task-vector family and its kernels (docs/methods.md)."""

from langmerge.methods.base import (
    Block,
    ChunkRule,
    Method,
    MethodParameters,
    NonFiniteMerge,
    ParameterSpec,
    Pass,
    TensorInfo,
    TensorMerge,
    global_field,
    model_field,
)
from langmerge.methods.driver import choose_kernel, chunk_ranges, merge_in_memory, run, thread_limit
from langmerge.methods.kernels import TensorParameters, merge_tensor
from langmerge.methods.registry import METHODS, get_method, method_names, register_method

__all__ = [
    "METHODS",
    "Block",
    "ChunkRule",
    "Method",
    "MethodParameters",
    "NonFiniteMerge",
    "ParameterSpec",
    "Pass",
    "TensorInfo",
    "TensorMerge",
    "TensorParameters",
    "choose_kernel",
    "chunk_ranges",
    "get_method",
    "global_field",
    "merge_in_memory",
    "merge_tensor",
    "method_names",
    "model_field",
    "register_method",
    "run",
    "thread_limit",
]
