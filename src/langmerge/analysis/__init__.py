"""Merge diagnostics: what a TIES-family merge keeps and loses (``langmerge analyze``, docs/analysis.md).

Public API: ``analyze(recipe, slacks=..., protect=...)`` returns an ``AnalysisReport``
(tallies per tensor, layer, module type and in total); ``tensor_tally`` is the
per-tensor diagnostic.
"""

from langmerge.analysis.diagnostics import AnalysisReport, Tally, analyze, module_type, tensor_tally

__all__ = ["AnalysisReport", "Tally", "analyze", "module_type", "tensor_tally"]
