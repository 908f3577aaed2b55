"""Models named by Hugging Face Hub id, resolved through ``huggingface_hub`` and its local cache.

Wherever langmerge takes a model it takes a *reference*: a local folder, or a
Hub id ``ORG/NAME`` with an optional ``@REVISION`` (branch, tag or commit
hash), as mergekit writes it. ``resolve_model`` turns one reference into a
local folder and where it came from (a ``ResolvedModel``):

- An existing local folder wins, even one named like ``org/name`` (as in
  transformers). A snapshot folder of the cache
  (``models--ORG--NAME/snapshots/COMMIT``) named by its path is recognised as
  ``ORG/NAME`` at ``COMMIT``.
- Otherwise the id is resolved to a commit. A commit hash whose files are all
  in the cache needs no network. Else, with the Hub reachable, one API call
  (``HfApi.model_info``) gives the commit of the revision and the repository's
  file list; offline (``HF_HUB_OFFLINE=1``), or when the Hub cannot be
  reached, the cache's refs give the commit and its snapshot the file list.
- The files a command reads are picked from that list (``needed_files``):
  config, generation config, tokenizer files and chat templates, adapter
  files, and the weights: the shards of the safetensors index, else the one
  safetensors file; pickle ``.bin`` weights only with ``allow_pickle`` and
  only where there are no safetensors.
- What of those the cache lacks is downloaded into the cache by
  ``snapshot_download`` (with its progress bar), after the resolution is known:
  ``download=False`` stops there, so ``langmerge check`` can say what each model
  resolved to before anything large is fetched.

The environment is read at call time, not at import time as huggingface_hub
reads some of it: ``HF_HUB_CACHE`` (else ``HF_HOME``/hub) for the cache,
``HF_HUB_OFFLINE``, ``HF_ENDPOINT``; ``HF_TOKEN`` through huggingface_hub's own
token lookup (gated and private models).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from langmerge.errors import LangmergeError
from langmerge.io.files import cache_repository, is_regular_file
from langmerge.io.lora import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_WEIGHTS
from langmerge.io.metadata import GENERATION_FILES, TOKENIZER_FILES, TRAINING_METADATA

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_ENDPOINT = "https://huggingface.co"
COMMIT = re.compile(r"[0-9a-f]{40}")
# A branch, tag or commit; "/" is allowed (refs/pr/1) but no ".." part: a revision names a file under the cache's refs/.
_REVISION = re.compile(r"(?!/)(?!.*(?:^|/)\.\.(?:/|$))[\w.\-/]+")

LOCAL = "local"  # a folder named by its path
CACHED = "cached"  # a Hub model whose files are all in the cache
DOWNLOADED = "downloaded"  # a Hub model fetched by this call
TO_DOWNLOAD = "to download"  # resolved with download=False; files still missing from the cache

# Files of a model repository that langmerge reads besides the weights.
CHAT_TEMPLATE_FOLDER = "additional_chat_templates/"
METADATA_FILES = ("config.json", *GENERATION_FILES, *TOKENIZER_FILES, ADAPTER_CONFIG, TRAINING_METADATA)
SAFETENSORS = ("model.safetensors.index.json", "model.safetensors", ".safetensors")
PICKLES = ("pytorch_model.bin.index.json", "pytorch_model.bin", ".bin")


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference and the local folder it stands for."""

    reference: str  # as the user wrote it
    folder: Path
    repo_id: str | None = None  # the Hub id (also for a cache snapshot named by its path)
    revision: str | None = None  # as requested: a branch, tag or commit; None for the default branch
    commit: str | None = None
    origin: str = LOCAL
    files: tuple[str, ...] = ()  # the files the command reads (Hub ids)
    pending: tuple[str, ...] = ()  # of those, the ones not yet in the cache
    pending_bytes: int | None = None

    @property
    def from_hub(self) -> bool:
        return self.origin != LOCAL

    @property
    def pinned(self) -> str:
        """The reference that names exactly these files again: ``ORG/NAME@COMMIT`` for a Hub id, else as written."""
        return f"{self.repo_id}@{self.commit}" if self.from_hub else self.reference

    def describe(self) -> str:
        if not self.from_hub:
            snapshot = f" (a cache snapshot of {self.repo_id}@{self.commit})" if self.repo_id else ""
            return f"folder {self.folder}{snapshot}"
        asked = f"{self.repo_id}@{self.revision or 'main'}"
        if self.origin == TO_DOWNLOAD:
            size = f", {_gigabytes(self.pending_bytes)}" if self.pending_bytes else ""
            state = f"{len(self.pending)} of {len(self.files)} files to download{size}"
        else:
            state = self.origin
        return f"{asked} -> commit {self.commit}, {state}, {self.folder}"

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "folder": str(self.folder),
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "origin": self.origin,
            "pinned": self.pinned,
            "files": list(self.files),
            "pending": list(self.pending),
            "pending_bytes": self.pending_bytes,
        }


def _gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


# ----------------------------------------------------------------------------- the environment, at call time


def hub_cache_dir() -> Path:
    """The huggingface_hub cache folder, from the environment as it is now."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(os.path.expanduser(home), "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def offline_mode() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


# ----------------------------------------------------------------------------- references


def parse_hub_id(reference: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` for ``ORG/NAME`` or ``ORG/NAME@REVISION``; None for anything else."""
    # huggingface_hub is imported only where a Hub id is handled: it is slow to import, and reads the
    # environment when imported (the module docstring says why langmerge reads it at call time).
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo, at, revision = reference.partition("@")
    if (at and not _REVISION.fullmatch(revision)) or repo.count("/") != 1:
        return None
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    return repo, revision or None


def _repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def hub_repository_folder(reference: str) -> Path | None:
    """The cache repository a Hub id's files live in (``<cache>/models--ORG--NAME``), known without the
    network; None for a local folder or a reference that is not a Hub id."""
    if Path(reference).exists():
        return None
    parsed = parse_hub_id(reference)
    return _repo_folder(hub_cache_dir(), parsed[0]) if parsed else None


def _local(reference: str, folder: Path) -> ResolvedModel:
    """A folder named by its path; a snapshot of the cache also says which Hub id and commit it holds."""
    repo = cache_repository(folder)
    resolved = folder.resolve()
    if repo is not None and repo.name.startswith("models--") and resolved.parent == repo / "snapshots":
        repo_id = repo.name.removeprefix("models--").replace("--", "/")
        commit = resolved.name if COMMIT.fullmatch(resolved.name) else None
        return ResolvedModel(reference, folder, repo_id, None, commit, LOCAL)
    return ResolvedModel(reference, folder)


def resolve_model(
    reference: str | Path | ResolvedModel,
    *,
    allow_pickle: bool = False,
    download: bool = True,
    progress: bool = True,
) -> ResolvedModel:
    """The local folder a model reference stands for, and its provenance (see the module doc).

    ``download=False`` resolves without fetching weights (the origin is then
    ``"to download"`` where the cache lacks files); passing that answer back
    fetches exactly those files, at the same commit. Errors are one-line
    ``LangmergeError``s naming the reference.
    """
    if isinstance(reference, ResolvedModel):
        if reference.origin == TO_DOWNLOAD and download:
            return _download(reference, progress)
        return reference
    ref = str(reference)
    local = Path(ref).expanduser()
    if local.is_dir():
        return _local(ref, local)
    if local.exists():
        raise LangmergeError(f"model {ref}: {local} is not a folder")
    parsed = parse_hub_id(ref)
    if parsed is None:
        raise LangmergeError(f"model {ref}: folder {ref} does not exist")
    repo_id, revision = parsed
    resolved = _locate(ref, repo_id, revision, allow_pickle)
    if resolved.origin == TO_DOWNLOAD and download:
        return _download(resolved, progress)
    return resolved


# ----------------------------------------------------------------------------- which files


def _weights(
    label: str,
    top: set[str],
    listing: set[str],
    kind: tuple[str, str, str],
    read_index: Callable[[str], str],
    skip: set[str],
) -> list[str]:
    """One kind of weights, chosen as the readers choose them: the index's shards, the single file, or the one file."""
    index, single, suffix = kind
    if index in top:
        text = read_index(index)
        try:
            weight_map = json.loads(text)["weight_map"]
            shards = sorted({str(v) for v in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LangmergeError(f"model {label}: {index}: unreadable index ({exc!r})") from None
        missing = [s for s in shards if s not in listing]
        if missing:
            raise LangmergeError(
                f"model {label}: {index} names shard {missing[0]!r}, which the repository does not have"
            )
        return [index, *shards]
    if single in top:
        return [single]
    candidates = sorted(f for f in top if f.endswith(suffix) and f not in skip)
    if len(candidates) > 1:
        raise LangmergeError(f"model {label}: {len(candidates)} {suffix} files and no {index}; which are the weights?")
    return candidates


def needed_files(
    label: str, listing: set[str], read_index: Callable[[str], str], *, allow_pickle: bool = False
) -> list[str]:
    """The files of a repository (``listing``: paths in it) that langmerge reads: metadata, then weights.

    ``read_index(name)`` returns the text of an index file. Raises when the
    repository has no weights langmerge may read.
    """
    top = {f for f in listing if "/" not in f}
    wanted = [f for f in METADATA_FILES if f in top] + sorted(f for f in listing if f.startswith(CHAT_TEMPLATE_FOLDER))
    pickle_hint = (
        "pickle files can run code when loaded: convert them to safetensors, or pass --allow-pickle to load "
        "them with torch.load(weights_only=True)"
    )
    if ADAPTER_CONFIG in top:
        if ADAPTER_WEIGHTS in top:
            return wanted + [ADAPTER_WEIGHTS]
        if ADAPTER_PICKLE in top:
            if not allow_pickle:
                raise LangmergeError(f"adapter {label}: only pickle weights ({ADAPTER_PICKLE}); {pickle_hint}")
            return wanted + [ADAPTER_PICKLE]
        raise LangmergeError(f"adapter {label}: no {ADAPTER_WEIGHTS} in the repository")
    skip = {ADAPTER_WEIGHTS, ADAPTER_PICKLE}
    weights = _weights(label, top, listing, SAFETENSORS, read_index, skip)
    if weights:
        return wanted + weights
    pickles = _weights(label, top, listing, PICKLES, read_index, skip)
    if pickles and not allow_pickle:
        raise LangmergeError(f"model {label}: only pickle (.bin) weights in the repository; {pickle_hint}")
    if not pickles:
        raise LangmergeError(f"model {label}: no safetensors weights in the repository")
    return wanted + pickles


# ----------------------------------------------------------------------------- the Hub and the cache


class _Unreachable(Exception):
    """The Hub could not be asked; ``reason`` says why, for the error when the cache cannot answer either."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "no answer from the Hub": the HTTP clients huggingface_hub uses raise their own."""
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _ask_hub(ref: str, repo_id: str, revision: str | None, call: Callable[[], T]) -> T:
    """Run a huggingface_hub call; answers that settle the matter become LangmergeErrors, the rest _Unreachable."""
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{hub_endpoint()}/{repo_id}"
    try:
        return call()
    except GatedRepoError:
        raise LangmergeError(
            f"model {ref}: {repo_id} is gated on the Hub: accept its conditions at {page} and set HF_TOKEN "
            "(or log in with `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise LangmergeError(
            f"model {ref}: no folder {ref} here, and no model {repo_id} on the Hub (a private model needs HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise LangmergeError(f"model {ref}: {repo_id} has no revision {revision!r} on the Hub") from None
    except OfflineModeIsEnabled:
        raise _Unreachable("offline mode is on (HF_HUB_OFFLINE=1)") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise LangmergeError(
                f"model {ref}: the Hub refused access to {repo_id} (HTTP {status}); set HF_TOKEN"
            ) from None
        raise _Unreachable(f"the Hub answered with an error ({_first_line(exc)})") from None
    except _network_errors() as exc:
        raise _Unreachable(f"the Hub is not reachable at {hub_endpoint()} ({_first_line(exc)})") from None


def _quiet_tqdm() -> type[Any]:
    """huggingface_hub's progress bar class, always disabled (for --no-progress)."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Quiet(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]  # huggingface_hub's tqdm: untyped

    return Quiet


def _literal(path: str) -> str:
    """``path`` as an ``allow_patterns`` entry matching only itself (they are fnmatch patterns)."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def _fetch(repo_id: str, commit: str, files: list[str], progress: bool) -> Path:
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        repo_id,
        revision=commit,
        cache_dir=str(hub_cache_dir()),
        allow_patterns=[_literal(f) for f in files],
        endpoint=hub_endpoint(),
        tqdm_class=None if progress else _quiet_tqdm(),
    )
    return Path(folder)


def _snapshot_listing(snapshot: Path) -> set[str]:
    return {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if is_regular_file(p)}


def _from_cache(ref: str, repo_id: str, revision: str | None, allow_pickle: bool) -> ResolvedModel | None:
    """The model as the cache holds it (commit from its refs, files from its snapshot).

    None if it is not there or incomplete.
    """
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()
    snapshot = None
    for probe in ("config.json", ADAPTER_CONFIG):
        found = try_to_load_from_cache(repo_id, probe, cache_dir=str(cache), revision=revision or "main")
        if isinstance(found, str):
            snapshot = Path(found).parent
            break
    if snapshot is None:
        return None
    listing = _snapshot_listing(snapshot)
    files = needed_files(
        f"{repo_id}@{snapshot.name}", listing, lambda name: (snapshot / name).read_text(), allow_pickle=allow_pickle
    )
    if any(not is_regular_file(snapshot / f) for f in files):
        return None
    return ResolvedModel(ref, snapshot, repo_id, revision, snapshot.name, CACHED, tuple(files))


def _locate(ref: str, repo_id: str, revision: str | None, allow_pickle: bool) -> ResolvedModel:
    if revision is not None and COMMIT.fullmatch(revision):
        cached = _from_cache(ref, repo_id, revision, allow_pickle)
        if cached is not None:
            return cached  # a commit never changes: no need to ask the Hub
    offline = offline_mode()
    try:
        if offline:
            raise _Unreachable("offline mode is on (HF_HUB_OFFLINE=1)")
        return _locate_online(ref, repo_id, revision, allow_pickle)
    except _Unreachable as exc:
        cached = _from_cache(ref, repo_id, revision, allow_pickle)
        if cached is None:
            where = f"{repo_id}@{revision}" if revision else repo_id
            raise LangmergeError(
                f"model {ref}: no folder {ref} here, {where} is not (completely) in the Hugging Face cache "
                f"{hub_cache_dir()}, and {exc.reason}"
            ) from None
        # Offline mode asks for the cache; an unreachable Hub is worth a warning (the branch may have moved).
        log.log(
            logging.INFO if offline else logging.WARNING,
            "model %s: %s; using the cached commit %s",
            ref,
            exc.reason,
            cached.commit,
        )
        return cached


def _locate_online(ref: str, repo_id: str, revision: str | None, allow_pickle: bool) -> ResolvedModel:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_endpoint())
    info = _ask_hub(ref, repo_id, revision, lambda: api.model_info(repo_id, revision=revision, files_metadata=True))
    commit = info.sha
    if commit is None:
        raise LangmergeError(f"model {ref}: the Hub named no commit for {repo_id}@{revision or 'main'}")
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    snapshot: Path = _repo_folder(hub_cache_dir(), repo_id) / "snapshots" / commit

    def read_index(name: str) -> str:
        if not is_regular_file(snapshot / name):
            _ask_hub(ref, repo_id, revision, lambda: _fetch(repo_id, commit, [name], progress=False))
        return (snapshot / name).read_text()

    files = needed_files(f"{repo_id}@{commit}", set(sizes), read_index, allow_pickle=allow_pickle)
    pending = tuple(f for f in files if not is_regular_file(snapshot / f))
    origin = TO_DOWNLOAD if pending else CACHED
    pending_bytes = sum(sizes.get(f) or 0 for f in pending) if pending else None
    return ResolvedModel(ref, snapshot, repo_id, revision, commit, origin, tuple(files), pending, pending_bytes)


def _download(resolved: ResolvedModel, progress: bool) -> ResolvedModel:
    ref, repo_id, commit = resolved.reference, resolved.repo_id, resolved.commit
    assert repo_id is not None and commit is not None  # a model of the Hub, resolved
    log.info("model %s: downloading %d files of %s@%s", ref, len(resolved.pending), repo_id, commit)
    try:
        folder = _ask_hub(
            ref, repo_id, resolved.revision, lambda: _fetch(repo_id, commit, list(resolved.pending), progress)
        )
    except _Unreachable as exc:
        raise LangmergeError(f"model {ref}: downloading {repo_id}@{commit} failed: {exc.reason}") from None
    missing = [f for f in resolved.files if not is_regular_file(folder / f)]
    if missing:
        raise LangmergeError(f"model {ref}: {missing[0]!r} is missing after downloading {repo_id}@{commit}")
    if resolved.revision is None or not COMMIT.fullmatch(resolved.revision):
        _write_ref(repo_id, resolved.revision or "main", commit)
    return replace(resolved, folder=folder, origin=DOWNLOADED, pending=())


def _write_ref(repo_id: str, revision: str, commit: str) -> None:
    """Record in the cache that ``revision`` resolved to ``commit``, as huggingface_hub's refs do.

    The files were fetched by commit (the one announced before the download),
    which does not write the ref; without it an offline run could not find them by branch or tag.
    """
    ref = _repo_folder(hub_cache_dir(), repo_id) / "refs" / revision
    try:
        if is_regular_file(ref) and ref.read_text() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
        tmp.write_text(commit)
        os.replace(tmp, ref)
    except OSError as exc:
        log.warning("could not record %s@%s -> %s in the cache (%s)", repo_id, revision, commit, exc)
