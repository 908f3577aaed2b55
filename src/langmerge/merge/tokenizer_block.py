"""mergekit's ``tokenizer:`` block and ``chat_template``: the schema, the embedding sources of named tokens,
and the chat template written with the output's tokenizer.

```yaml
tokenizer:
  source: union                  # base | union (the default, as in mergekit) | one of the models
  tokens:                        # tokens whose rows come from a named source (added if the vocabulary lacks them)
    <|im_start|>: {source: chatml_model}                      # that model's row of the same token
    <|im_end|>: {source: {kind: model_token, model: m, token: "</s>"}, force: true}   # or token_id: 2
    <pad>: {source: {kind: zero}}
  pad_to_multiple_of: 64         # embedding rows rounded up; the new rows are each model's mean row, merged
chat_template: chatml            # a built-in name, auto (the models' most common template) or a Jinja template
```

A token's source gives its row where no model has the token, and everywhere
with ``force: true`` (the output row is then exactly that embedding, in every
vocabulary tensor). Which rows those are is decided by the vocabulary step
(``merge.vocab``) and planned as tasks of their own (``merge.plan``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from langmerge.errors import LangmergeError
from langmerge.io.files import optional_folder_file, read_json, read_regular

if TYPE_CHECKING:  # vocab imports this module
    from langmerge.merge.vocab import ModelVocab


class ModelTokenSource(BaseModel):
    """The row of ``token`` (or of id ``token_id``) in ``model``'s own vocabulary."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenSource:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of 'token' and 'token_id'")
        return self


class ZeroSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class TokenSetting(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: ModelTokenSource | ZeroSource | str
    force: bool = False


class TokenizerSettings(BaseModel):
    """mergekit's ``tokenizer:`` block; ``source`` defaults to ``union`` as there."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


# ----------------------------------------------------------------------------- chat templates

# Written for langmerge from each format's public description. chatml and mistral render conversations exactly as
# mergekit's templates of the same names; alpaca too, but for a newline mergekit's lacks before the generation
# prompt; llama3 and exaone render the formats without the stray newlines and indentation mergekit's add
# (tests/test_tokenizer_block.py compares them all).
BUILTIN_CHAT_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
        " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}"
        "{% for m in turns %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant after an optional system message') }}{% endif %}"
        "{% if m['role'] == 'user' %}{{ ' [INST] ' + (system + '\n\n' if loop.first and system is defined else '')"
        " + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
        "{% else %}{{ raise_exception('only user and assistant roles, after an optional system message') }}{% endif %}"
        "{% endfor %}"
    ),
    "alpaca": (
        "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{{ (systems | last).content | trim if systems else '' }}{{ '\n\n' }}"
        "{% set headers = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'} %}"
        "{% for m in messages if m['role'] in headers %}{{ headers[m['role']] + '\n' + m['content'] | trim }}"
        "{% if not loop.last %}{{ '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '\n\n### Response:\n' }}{% endif %}"
    ),
    "exaone": (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
        "{{ '[|system|][|endofturn|]\n' }}{% endif %}"
        "{{ '[|' + m['role'] + '|]' + m['content'] + ('\n' if m['role'] == 'user' else '[|endofturn|]\n') }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def check_chat_template(value: str) -> None:
    """A recipe's ``chat_template``: ``auto``, a built-in name, or a Jinja template that compiles."""
    if value == "auto" or value in BUILTIN_CHAT_TEMPLATES:
        return
    if "{" not in value:
        raise LangmergeError(
            f"recipe key 'chat_template': {value!r} is neither 'auto', a built-in template "
            f"({', '.join(sorted(BUILTIN_CHAT_TEMPLATES))}) nor a Jinja template"
        )
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # only a recipe with a chat template needs it

        ImmutableSandboxedEnvironment().parse(value)
    except ImportError:  # transformers needs jinja2 for chat templates: without it nothing could use one
        raise LangmergeError("recipe key 'chat_template': a Jinja template needs the jinja2 package") from None
    except Exception as exc:  # jinja2.TemplateSyntaxError
        raise LangmergeError(f"recipe key 'chat_template': not a valid Jinja template ({exc})") from None


def model_chat_template(folder: Path) -> str | None:
    """A model folder's chat template: ``chat_template.jinja``, else tokenizer_config.json's (its default one)."""
    path = optional_folder_file(folder, "chat_template.jinja")
    if path is not None:
        return read_regular(path).decode("utf-8")
    config_path = optional_folder_file(folder, "tokenizer_config.json")
    if config_path is None:
        return None
    config = read_json(config_path) or {}
    if not isinstance(config, dict):
        raise LangmergeError(f"{config_path}: expected a JSON object")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{name, template}, ...]
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    return template if isinstance(template, str) and template.strip() else None


def resolve_chat_template(value: str, folders: list[Path]) -> tuple[str | None, str]:
    """The template to write and how it was chosen; ``auto`` is the models' most common one (None: they have none)."""
    if value in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[value], f"the built-in {value} template"
    if value != "auto":
        return value, "the recipe's Jinja template"
    templates = [t.strip() for t in (model_chat_template(f) for f in folders) if t]
    if not templates:
        return None, "auto: no model has a chat template, none is written"
    template, count = Counter(templates).most_common(1)[0]
    return template, f"auto: the chat template {count} of the {len(folders)} models have"


def write_chat_template(out: Path, template: str) -> None:
    """``chat_template.jinja`` in ``out``, and no other copy of a template that transformers might read instead."""
    (out / "chat_template.jinja").write_text(template)
    (out / "chat_template.json").unlink(missing_ok=True)
    config_path = out / "tokenizer_config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        if "chat_template" in config:
            del config["chat_template"]
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- named tokens' rows


def token_rows(
    settings: TokenizerSettings,
    models: Sequence[ModelVocab],
    index_of: Callable[[str], int | None],
    out_tokens: dict[str, int],
    presence: Callable[[int], bool],
) -> dict[int, tuple[Any, ...]]:
    """Output row -> where its values come from, for the block's tokens: ``("row", k, row)`` (model ``k``'s row),
    ``("zero",)``. ``models`` are the vocabulary step's ``ModelVocab`` (base first), ``index_of(ref)`` a model
    reference's position among them (None: not a model of the recipe), ``presence(j)`` whether any model has row j.
    A token some model has keeps the merge's rows unless ``force``."""
    out: dict[int, tuple[Any, ...]] = {}
    for token, setting in (settings.tokens or {}).items():
        where = f"recipe key 'tokenizer.tokens.{token}'"
        j = out_tokens[token]
        if presence(j) and not setting.force:
            continue
        source = setting.source
        if isinstance(source, ZeroSource):
            out[j] = ("zero",)
            continue
        ref = source if isinstance(source, str) else source.model
        k = index_of(ref)
        if k is None:
            raise LangmergeError(f"{where}: {ref!r} is not one of the recipe's models")
        m = models[k]
        if isinstance(source, str) or source.token is not None:
            wanted = token if isinstance(source, str) else source.token
            assert wanted is not None
            row = m.tokens.get(wanted) if m.tokens is not None else None
            if row is None:
                raise LangmergeError(f"{where}: model {m.label} has no token {wanted!r}")
        else:
            row = source.token_id
        assert row is not None  # ModelTokenSource names a token or a token_id
        if m.rows is None or row >= m.rows:
            raise LangmergeError(f"{where}: row {row} of model {m.label} is beyond its {m.rows} embedding rows")
        out[j] = ("row", k, row)
    return out
