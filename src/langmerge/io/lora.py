"""PEFT LoRA adapters as merge inputs, applied to their base one row block at a time.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) can
stand wherever a model can. ``LoraSource`` (a ``TensorSource``) has the base's
tensor names and shapes; reading rows ``i .. j`` of an adapted tensor gives
``W[i:j] + scale * (B @ A)[i:j]`` (``(B @ A).T`` for ``fan_in_fan_out`` and for
LoRA on an embedding) computed in float32 from those rows alone, with
``scale = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``): the whole
delta is never in memory. Tensors the adapter saves whole (``modules_to_save``,
resized embeddings) replace the base's and are read at their file offset.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from langmerge.errors import LangmergeError
from langmerge.io.files import folder_file, open_regular, read_json
from langmerge.io.pickle_reader import load_pickle_state_dict
from langmerge.io.safetensors_format import TensorEntry, read_header, read_range
from langmerge.io.tensor_source import TensorSource, into

if TYPE_CHECKING:
    from langmerge.io.hub import ResolvedModel

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."


class AdapterMismatch(LangmergeError):
    """The adapter was not trained on the recipe's base model (names, shapes or recorded base differ)."""


def is_adapter(folder: str | Path) -> bool:
    """Whether the folder is a PEFT adapter (names an adapter_config.json; read_adapter_config checks the file)."""
    return (Path(folder) / ADAPTER_CONFIG).exists()


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, Any]
    alpha_pattern: dict[str, Any]
    base_model_name_or_path: str | None
    base_revision: str | None = None  # PEFT's "revision": the base's revision the adapter was trained on

    def _pattern(self, pattern: dict[str, Any], module: str, default: float) -> Any:
        # PEFT matches a pattern key against the end of the module name.
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    def scale(self, module: str, rank: int) -> float:
        r = int(self._pattern(self.rank_pattern, module, self.r))
        if r != rank:
            raise LangmergeError(f"LoRA module {module!r}: rank {rank} in the weights but r={r} in {ADAPTER_CONFIG}")
        alpha = float(self._pattern(self.alpha_pattern, module, self.alpha))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def read_adapter_config(folder: Path) -> LoraSettings:
    path = folder / ADAPTER_CONFIG
    cfg: Any = read_json(folder_file(folder, ADAPTER_CONFIG) or path)  # JSON: checked key by key below
    if not isinstance(cfg, dict):
        raise LangmergeError(f"{path}: not a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LangmergeError(f"{path}: peft_type {peft_type!r} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise LangmergeError(
            f"{path}: a DoRA adapter ('use_dora': true) is not supported; merge it into its base with PEFT's "
            "merge_and_unload() and name the merged folder in the recipe"
        )
    for key in ("trainable_token_indices", "layer_replication"):
        if cfg.get(key):
            raise LangmergeError(f"{path}: {key!r} is not supported")
    try:
        settings = LoraSettings(
            r=int(cfg["r"]),
            alpha=float(cfg["lora_alpha"] if "lora_alpha" in cfg else cfg["r"]),
            use_rslora=bool(cfg.get("use_rslora", False)),
            fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
            rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
            base_model_name_or_path=cfg.get("base_model_name_or_path") or None,
            base_revision=cfg.get("revision") or None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LangmergeError(f"{path}: bad LoRA settings ({exc!r})") from exc
    ranks = [settings.r, *settings.rank_pattern.values()]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise LangmergeError(f"{path}: LoRA ranks ('r', 'rank_pattern') must be whole numbers of at least 1")
    return settings


def _adapter_tensors(folder: Path, allow_pickle: bool) -> dict[str, TensorEntry | torch.Tensor]:
    """Name -> TensorEntry (safetensors) or tensor (pickle, only when allowed)."""
    st = folder_file(folder, ADAPTER_WEIGHTS)
    if st is not None:
        return dict(read_header(st))
    pickle = folder_file(folder, ADAPTER_PICKLE)
    if pickle is not None:
        if not allow_pickle:
            raise LangmergeError(
                f"adapter {folder}: only pickle weights ({ADAPTER_PICKLE}); pickle files can run code when loaded: "
                "convert them to safetensors, or pass --allow-pickle"
            )

        return dict(load_pickle_state_dict(pickle))
    raise LangmergeError(f"adapter {folder}: no {ADAPTER_WEIGHTS} in the folder")


@dataclass(frozen=True)
class LoraPair:
    a_key: str
    b_key: str
    module: str
    embedding: bool  # lora_embedding_A/B: delta is (B @ A).T


def check_adapter_base(
    settings: LoraSettings,
    adapter: Path,
    base_ref: str,
    base_config: dict[str, Any] | None,
    base_model: ResolvedModel | None = None,
) -> None:
    """Refuse an adapter whose recorded base is not the recipe's base model.

    A recorded local folder must be the same folder; a recorded hub id must equal
    the recipe's reference, the base's Hub id (``base_model``: a Hub id in the
    recipe, or a cache snapshot named by path), the base config's ``_name_or_path``,
    or the last part of the base folder's path (a local mirror of the hub
    repository). A recorded commit that differs from the base's is worth a warning
    (a commit may change only the model card).
    """
    recorded = settings.base_model_name_or_path
    if recorded is None:
        log.warning("adapter %s records no base model; checking tensor names and shapes only", adapter)
        return
    base_path = base_model.folder if base_model is not None else Path(base_ref)
    base_id = base_model.repo_id if base_model is not None else None
    recorded_path = Path(recorded)
    if recorded_path.is_dir():
        if recorded_path.resolve() == base_path.resolve():
            return
    elif (
        recorded in (base_ref, base_id, (base_config or {}).get("_name_or_path"))
        or recorded.rstrip("/").split("/")[-1] == base_path.resolve().name
    ):
        commit = base_model.commit if base_model is not None else None
        revision = settings.base_revision
        if (
            recorded == base_id
            and commit
            and revision
            and re.fullmatch(r"[0-9a-f]{40}", revision)
            and revision != commit
        ):
            log.warning(
                "adapter %s was trained on %s@%s; the recipe's base is commit %s", adapter, recorded, revision, commit
            )
        return
    raise AdapterMismatch(
        f"adapter {adapter}: its base is {recorded!r} ({ADAPTER_CONFIG} base_model_name_or_path) but the recipe's "
        f"base_model is {base_ref!r}; a LoRA adapter only applies to the model it was trained on "
        f"(if this is the same model, set base_model_name_or_path to {base_ref!r})"
    )


class LoraSource(TensorSource):
    """A base checkpoint with a LoRA adapter applied, tensor by tensor."""

    def __init__(
        self,
        base: TensorSource,
        adapter_folder: str | Path,
        label: str | None = None,
        *,
        base_ref: str,
        allow_pickle: bool = False,
        base_model: ResolvedModel | None = None,
    ):
        self.base = base  # owned: closed with this source
        self.folder = Path(adapter_folder)
        self.label = label or str(adapter_folder)
        self.settings = read_adapter_config(self.folder)
        check_adapter_base(self.settings, self.folder, base_ref, base.config(), base_model)
        self._tensors = _adapter_tensors(self.folder, allow_pickle)
        self._handle: BinaryIO | None = None
        self._lock = threading.Lock()
        self.pairs: dict[str, LoraPair] = {}
        self.whole: dict[str, str] = {}  # base tensor name -> adapter key saved whole
        self._parse()

    @property
    def tokenizer_folder(self) -> Path:
        """The adapter's own tokenizer when it ships one (a resized vocabulary), else the base's."""
        if (self.folder / "tokenizer.json").exists() or (self.folder / "tokenizer_config.json").exists():
            return self.folder
        return self.base.tokenizer_folder

    def _parse(self) -> None:
        halves: dict[str, dict[str, str]] = {}
        for key in self._tensors:
            name = key.removeprefix(_PEFT_PREFIX)
            m = re.fullmatch(
                r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)(?:\.default)?",
                name,
            )
            if m:
                module = m.group(1) or m.group(3)
                kind = m.group(2) or m.group(4)
                halves.setdefault(module, {})[kind] = key
                continue
            if "lora_" in name or "magnitude" in name:
                raise LangmergeError(f"adapter {self.label}: tensor {key!r} is not a LoRA weight langmerge understands")
            target = (
                name.replace(".modules_to_save.default.", ".")
                .replace(".modules_to_save.", ".")
                .replace(".base_layer.", ".")
            )
            if target not in self.base:
                raise AdapterMismatch(
                    f"adapter {self.label}: saved tensor {key!r} has no counterpart {target!r} "
                    f"in the base {self.base.label}"
                )
            self.whole[target] = key
        for module, kinds in halves.items():
            embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
            a, b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
            if a not in kinds or b not in kinds:
                raise LangmergeError(f"adapter {self.label}: module {module!r} has only one of {a}, {b}")
            target = module + ".weight"
            if target not in self.base:
                raise AdapterMismatch(
                    f"adapter {self.label}: adapted module {module!r} has no tensor {target!r} in the base "
                    f"{self.base.label}; is this adapter for another model?"
                )
            a_shape, b_shape = self._shape(kinds[a]), self._shape(kinds[b])
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise LangmergeError(
                    f"adapter {self.label}: module {module!r}: LoRA shapes {list(a_shape)} and {list(b_shape)} "
                    "do not chain"
                )
            delta_shape = (b_shape[0], a_shape[1])
            if embedding or self.settings.fan_in_fan_out:
                delta_shape = delta_shape[::-1]
            # PEFT's save_embedding_layers ("auto" when an embedding is a target) saves the layer's weight whole
            # (``embed_tokens.base_layer.weight``): that is the W the delta is added to.
            base_shape = self.shape(target)
            if tuple(base_shape) != delta_shape:
                raise AdapterMismatch(
                    f"adapter {self.label}: module {module!r} changes a {list(delta_shape)} weight but {target!r} is "
                    f"{list(base_shape)} in the base {self.base.label}; the adapter was trained on another base"
                )
            if target in self.whole and ".base_layer." not in self.whole[target]:
                raise LangmergeError(
                    f"adapter {self.label}: {target!r} is both saved whole ({self.whole[target]!r}, "
                    "modules_to_save) and adapted"
                )
            self.settings.scale(module, a_shape[0])  # validates rank/pattern now, before any merge
            self.pairs[target] = LoraPair(kinds[a], kinds[b], module, embedding)

    def _shape(self, key: str) -> tuple[int, ...]:
        t = self._tensors[key]
        return tuple(t.shape)

    def _read(self, key: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``start .. stop`` of the adapter tensor ``key`` (read at its offset, or from memory: pickle)."""
        t = self._tensors[key]
        if isinstance(t, torch.Tensor):
            return into(out, t.reshape(-1)[start:stop])
        with self._lock:
            if self._handle is None:
                self._handle = open_regular(t.file)
            handle = self._handle
        return read_range(t, handle.fileno(), start, stop, out)

    def _whole(self, key: str) -> torch.Tensor:
        t = self._tensors[key]
        n = math.prod(self._shape(key))
        return self._read(key, 0, n, torch.empty(n, dtype=t.dtype)).reshape(self._shape(key))

    @property
    def names(self) -> list[str]:
        return self.base.names

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.whole:
            return self._shape(self.whole[name])
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        if name in self.whole:
            return self._tensors[self.whole[name]].dtype
        return self.base.dtype(name)

    def read_dtype(self, name: str) -> torch.dtype:
        if name in self.pairs:
            return torch.float32  # W + scale * B @ A is computed in float32
        return self.dtype(name) if name in self.whole else self.base.read_dtype(name)

    def delta_rows(self, name: str, first: int, last: int) -> torch.Tensor:
        """Rows ``first .. last`` of ``scale * B @ A`` for an adapted tensor, in float32."""
        pair = self.pairs[name]
        a = self._whole(pair.a_key).float()
        b = self._whole(pair.b_key).float()
        if pair.embedding or self.settings.fan_in_fan_out:
            d = (b @ a[:, first:last]).T  # rows of (B @ A).T are columns of B @ A
        else:
            d = b[first:last] @ a
        return d * self.settings.scale(pair.module, a.shape[0])

    def _read_weight(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Elements of the weight before any delta: the adapter's saved copy when it has one, else the base's."""
        if name in self.whole:
            return self._read(self.whole[name], start, stop, out)
        return self.base.read(name, start, stop, out)

    def read(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        if name not in self.pairs:
            return self._read_weight(name, start, stop, out)
        if stop <= start:
            return out[:0]
        width = math.prod(self.shape(name)[1:])
        first, last = start // width, (stop - 1) // width + 1
        weight_dtype = self.dtype(name) if name in self.whole else self.base.read_dtype(name)
        rows = torch.empty((last - first) * width, dtype=weight_dtype)
        w = self._read_weight(name, first * width, last * width, rows).reshape(last - first, width)
        values = w.float() + self.delta_rows(name, first, last)
        return into(out, values.reshape(-1)[start - first * width : stop - first * width])

    def config(self) -> dict[str, Any] | None:
        return self.base.config()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self.base.close()
