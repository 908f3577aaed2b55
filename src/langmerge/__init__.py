"""langmerge: task-solving LLMs for low-resource languages by model merging."""

from langmerge.engine import MergeReport, merge
from langmerge.errors import LangmergeError
from langmerge.recipe import Recipe, load_recipe

__version__ = "0.1.0"
__all__ = ["merge", "MergeReport", "LangmergeError", "Recipe", "load_recipe", "__version__"]
