"""The one exception type users see.

Every error caused by input (a recipe, a model folder, a tensor) is a
``LangmergeError`` whose message names the offending file, tensor or key; the
CLI prints it on one line and exits with code 2.
"""


class LangmergeError(Exception):
    """Bad input: the message says what and where."""
