"""Command-line options: the flags every command shares, declared once, and flags generated from pydantic models.

``add_model_options(parser, Model)`` adds one flag per field of ``Model`` (``seq_len`` becomes
``--seq-len``): its type, its choices (a ``Literal``), a bool as ``--flag`` (or ``--flag/--no-flag``
when it defaults to on), a sequence as several values, and a nested model that may be ``None``
(``lora``) as ``--lora`` plus ``--lora-<field>`` for its fields. The help is the field's
``description`` with its default and unit (``json_schema_extra``: ``unit``, ``default_text``;
``metavar`` names the value).
A value that a field's own constraints refuse is refused while parsing, as argparse refuses any
bad value (one line naming the flag, exit 2). ``model_from_args(args, Model)`` builds the model from
the flags given, so the model's defaults and checks are the only ones; a check across fields that
fails is a one-line ``LangmergeError`` naming the flags. Both word an error as
``input_files.error_text`` does, the one wording configuration files' errors have too.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from langmerge.devices import resolve_device
from langmerge.errors import LangmergeError
from langmerge.input_files import BOUND_WORDS, describe_error, error_text

# ----------------------------------------------------------------------------- argparse types


def parse_size(text: str) -> int:
    """Bytes from '5GB', '500MB', '1e9' or a plain integer."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper().replace(" ", "")
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    try:
        return int(float(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 5GB or 500MB)") from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def device_name(text: str) -> str:
    """An argparse type: cpu, cuda, cuda:N or mps, present on this machine."""
    if text == "cpu":
        return text  # the default: no need to import torch while parsing
    try:
        resolve_device(text, key="")
    except LangmergeError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None
    return text


# ----------------------------------------------------------------------------- shared flags


@dataclass(frozen=True)
class SharedFlag:
    """A flag several commands take: its name, kind and default are declared here once.

    ``help`` is the usual text; a command whose flag means something more particular
    (``--force`` of ``study`` reruns cached steps) passes its own to ``add``.
    """

    name: str
    help: str
    options: dict[str, Any] = field(default_factory=dict)  # add_argument's keywords besides the help

    def add(self, parser, help: str | None = None) -> None:
        parser.add_argument(self.name, help=help or self.help, **self.options)


FORCE = SharedFlag("--force", "replace an existing output folder", {"action": "store_true"})
NO_PROGRESS = SharedFlag("--no-progress", "hide the progress bar", {"action": "store_true"})
ALLOW_PICKLE = SharedFlag(
    "--allow-pickle", "read .bin (pickle) weights with torch.load(weights_only=True)", {"action": "store_true"}
)
DEVICE = SharedFlag("--device", "cpu, cuda, cuda:N or mps", {"type": device_name, "default": "cpu"})
THREADS = SharedFlag("--threads", "CPU threads for the tensor arithmetic", {"type": positive_int, "default": None})


# ----------------------------------------------------------------------------- flags from a model


@dataclass(frozen=True)
class _Option:
    path: tuple[str, ...]  # field names from the model down: ("lora", "rank")
    flag: str  # --lora-rank
    dest: str  # lora_rank


def _optional(annotation: Any) -> Any:
    """``X | None`` -> ``X`` (other annotations as they are)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_sequence(annotation: Any) -> bool:
    """A list or tuple, or a union with one (``str | tuple[str, ...]``): several values on the command line."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return any(_is_sequence(a) for a in typing.get_args(annotation))
    return typing.get_origin(annotation) in (list, tuple)


def _default_text(info: FieldInfo) -> str:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if "default_text" in extra:
        return str(extra["default_text"])
    default = info.get_default(call_default_factory=True)
    if isinstance(default, bool) or _is_model(_optional(info.annotation)):  # a switch: a flag, or a nested model
        return "on" if default else "off"
    if default is None:
        return "none"
    text = " ".join(default) if isinstance(default, (list, tuple)) else str(default)
    return f"{text} {extra['unit']}" if "unit" in extra else text


def field_help(info: FieldInfo) -> str:
    """The field's description with its default and unit: ``tokens per sequence (default: 512 tokens)``."""
    return f"{info.description or ''} (default: {_default_text(info)})".lstrip()


def _options(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[_Option, FieldInfo, Any]]:
    """Every flag of ``model``: (option, field, annotation without None), nested models' fields after theirs."""
    out = []
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        dest = "_".join(path)
        annotation = _optional(info.annotation)
        out.append((_Option(path, "--" + dest.replace("_", "-"), dest), info, annotation))
        if _is_model(annotation):
            out += _options(annotation, path)
    return out


def model_flags(model: type[BaseModel]) -> dict[tuple[str, ...], str]:
    """Field path -> its flag, for every field of ``model`` and of its nested models."""
    return {option.path: option.flag for option, _, _ in _options(model)}


def _bounds_text(info: FieldInfo) -> str:
    """The field's bounds in words: `` of at least 1``."""
    bounds = BOUND_WORDS.items()
    parts = [f"{words} {getattr(m, key)}" for m in info.metadata for key, words in bounds if hasattr(m, key)]
    return " of " + " and ".join(parts) if parts else ""


def _value_type(annotation: type, info: FieldInfo):
    """An argparse type for one field: the text as ``annotation``, checked by the field's own constraints, so a
    refused value is argparse's one line naming the flag, worded as ``input_files.error_text`` words it."""
    parts = (annotation, *info.metadata)
    checked: Any = Annotated[parts] if info.metadata else annotation
    adapter: TypeAdapter[Any] = TypeAdapter(checked)
    kind = {int: "a whole number", float: "a number"}.get(annotation)

    def parse(text: str) -> Any:
        try:
            value = annotation(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}{_bounds_text(info)}, got {text!r}") from None
        try:
            return adapter.validate_python(value)
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(error_text(exc.errors()[0])) from None

    parse.__name__ = annotation.__name__  # argparse's fallback message names the type
    return parse


def add_model_options(parser, model: type[BaseModel], shared: Sequence[SharedFlag] = ()) -> None:
    """One flag per field of ``model`` (see the module's docstring), on ``parser`` or an argument group.

    A field whose flag is one of ``shared`` (``--device``) is added as that flag, as every command has it.
    """
    common = {flag.name: flag for flag in shared}
    for option, info, annotation in _options(model):
        if option.flag in common:
            common.pop(option.flag).add(parser)
            continue
        kwargs: dict[str, Any] = {"dest": option.dest, "default": argparse.SUPPRESS, "help": field_help(info)}
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if "metavar" in extra:
            kwargs["metavar"] = extra["metavar"]
        if _is_model(annotation) or annotation is bool:
            if info.default is True:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["action"] = "store_true"
        elif typing.get_origin(annotation) is Literal:
            choices = list(typing.get_args(annotation))
            kwargs |= {"choices": choices, "type": type(choices[0])}
        elif _is_sequence(annotation):
            kwargs["nargs"] = "+"
        elif annotation in (int, float, str):
            kwargs["type"] = _value_type(annotation, info)
        else:
            raise TypeError(f"{model.__name__}.{'.'.join(option.path)}: no command-line form for {annotation}")
        parser.add_argument(option.flag, **kwargs)
    if common:
        raise TypeError(f"{model.__name__} has no field for {', '.join(common)}")


def model_from_args(args: argparse.Namespace, model: type[BaseModel]):
    """The model from the flags ``add_model_options`` added and the command line gave (the rest: its defaults)."""
    given = vars(args)
    options = _options(model)
    # A nested model (--lora) is on when its flag is given; the flags of its fields need it.
    switches = {option.path: option.flag for option, _, annotation in options if _is_model(annotation)}
    on = {path for path in switches if given.get("_".join(path))}
    data: dict[str, Any] = {}
    for option, _, annotation in options:
        if option.dest not in given:
            continue
        parent, name = option.path[:-1], option.path[-1]
        if parent and parent not in on:
            raise LangmergeError(f"{option.flag} needs {switches[parent]}")
        target = data
        for part in parent:
            target = target.setdefault(part, {})
        if _is_model(annotation):
            if option.path in on:
                target.setdefault(name, {})
        else:
            target[name] = given[option.dest]
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise LangmergeError(option_message(exc, model_flags(model))) from None


def option_message(exc: ValidationError, flags: dict[tuple[str, ...], str]) -> str:
    """The first error pydantic reports, in flags: ``argument --seq-len: must be at least 2, got 1``
    (``input_files.describe_error``'s wording, after the flag).

    A check across fields (no location) names the fields by key; they become flags too.
    """
    err = exc.errors()[0]
    loc = tuple(str(p) for p in err["loc"])
    if loc in flags:
        return describe_error(err, f"argument {flags[loc]}")
    names = {"_".join(path): flag for path, flag in flags.items()}
    pattern = r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b"
    return re.sub(pattern, lambda m: names[m.group(1)], error_text(err))
