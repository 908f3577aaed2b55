"""Where tensors are computed: the one check of a device name (``--device``, ``evaluation.device``)."""

from __future__ import annotations

import re

import torch

from langmerge.errors import LangmergeError

_DEVICE = re.compile(r"(cpu|cuda|mps)(?::(\d+))?")


def resolve_device(name: str, key: str = "--device", *, here: bool = True):
    """The ``torch.device`` for ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a LangmergeError naming ``key``
    for any other name and (with ``here``) for a device this machine does not have."""
    m = _DEVICE.fullmatch(str(name).strip())
    if not m or (m[1] != "cuda" and m[2] is not None):
        raise LangmergeError(f"{key} {name!r}: not a device; use cpu, cuda, cuda:N or mps")
    kind, index = m[1], m[2]
    if not here:
        return torch.device(m[0])
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise LangmergeError(f"{key} {name}: no CUDA GPU is available")
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise LangmergeError(f"{key} {name}: this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise LangmergeError(f"{key} {name}: the Apple MPS device is not available")
    return torch.device(m[0])
