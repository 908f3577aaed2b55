"""langmerge: task-solving LLMs for low-resource languages by model merging."""

from langmerge.errors import LangmergeError
from langmerge.merge import MergeReport, Recipe, load_recipe, merge  # binds langmerge.merge to the function

__version__ = "0.1.0"
__all__ = ["merge", "MergeReport", "LangmergeError", "Recipe", "load_recipe", "__version__"]
