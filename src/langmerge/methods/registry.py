"""The registry of merge methods: every place that needs the list of methods asks here.

The recipe's ``merge_method``, the study's methods and their report labels,
``check`` and ``analyze`` (``has_sign_vote``) all read ``METHODS``; a method
added with ``register_method`` (in langmerge or in a user's module) is known
to all of them.
"""

from __future__ import annotations

from typing import Any

from langmerge.errors import LangmergeError
from langmerge.methods.arcee_fusion import ARCEE_FUSION
from langmerge.methods.base import Method
from langmerge.methods.karcher import KARCHER
from langmerge.methods.layer_swap import LAYER_SWAP
from langmerge.methods.model_stock import MODEL_STOCK
from langmerge.methods.multislerp import MULTISLERP
from langmerge.methods.nearswap import NEARSWAP
from langmerge.methods.nuslerp import NUSLERP
from langmerge.methods.passthrough import PASSTHROUGH
from langmerge.methods.ram import RAM, RAMPLUS_TL
from langmerge.methods.sce import SCE
from langmerge.methods.slerp import SLERP
from langmerge.methods.task_vectors import ENTRIES

METHODS: dict[str, Method[Any]] = {}


def register_method(method: Method[Any], *, replace: bool = False) -> Method[Any]:
    """Make ``method`` known by its name to recipes, ``check``, ``analyze`` and the study; returns it.

    A second method of the same name is refused unless ``replace``.
    """
    if not isinstance(method, Method):
        raise TypeError(f"register_method: {method!r} is not a langmerge.methods.Method")
    if method.name in METHODS and not replace:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> Method[Any]:
    try:
        return METHODS[name]
    except KeyError:
        raise LangmergeError(
            f"recipe key 'merge_method': unknown method {name!r}; choose one of {', '.join(METHODS)}"
        ) from None


# every method of mergekit 0.1.5's registry, then langmerge's own (ties_sv among the family's entries, layer_swap)
_BUILTIN: tuple[Method[Any], ...] = (
    *ENTRIES,
    SLERP,
    NUSLERP,
    MULTISLERP,
    KARCHER,
    SCE,
    MODEL_STOCK,
    NEARSWAP,
    ARCEE_FUSION,
    PASSTHROUGH,
    RAM,
    RAMPLUS_TL,
    LAYER_SWAP,
)
for _entry in _BUILTIN:
    register_method(_entry)
del _entry, _BUILTIN
