"""Merging: the recipe schema, the plan, the one executor, vocabulary alignment, ``check`` and the CLI.

- ``recipe``: mergekit's recipe format (``load_recipe``, ``Recipe``);
- ``plan``: every tensor's inputs, parameters, kernel and output placement, every problem collected (``plan_merge``);
- ``vocab``: vocabulary alignment as a step of the plan (rows merged by which models have each token);
- ``execute``: the executor ``merge``, ``tune`` and ``analyze`` share (chunked, pipelined, in flat memory);
- ``check``: ``langmerge check``'s report; ``cli``: the ``merge``, ``check`` and ``demo`` subcommands.

``langmerge.merge`` is also the function ``merge`` (``langmerge/__init__.py`` binds it there): import this
package's modules with ``from langmerge.merge.plan import ...``.
"""

from langmerge.merge.execute import DEFAULT_MEMORY, Executor, MergeReport, merge
from langmerge.merge.plan import MergePlan, plan_merge
from langmerge.merge.recipe import Recipe, load_recipe

__all__ = ["DEFAULT_MEMORY", "Executor", "MergePlan", "MergeReport", "Recipe", "load_recipe", "merge", "plan_merge"]
