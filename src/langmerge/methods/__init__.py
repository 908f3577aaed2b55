"""Merge methods: pure per-tensor kernels and the registry that configures them."""

from langmerge.methods.kernels import TensorParameters, merge_tensor
from langmerge.methods.registry import METHODS, MergeMethod, get_method

__all__ = ["METHODS", "MergeMethod", "TensorParameters", "get_method", "merge_tensor"]
