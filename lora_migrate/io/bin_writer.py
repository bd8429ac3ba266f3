"""Write a PyTorch ``.bin`` state dict that ``torch.load(weights_only=True)`` reads back.

``torch.save`` pickles whole storages, so a tensor that is a view (a slice of a fused matrix, a row of a
bigger buffer) would drag its entire storage into the file. Such tensors are cloned to compact contiguous
storage first; tensors that already own exactly their storage are saved as they are (no extra copy).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lora_migrate.errors import LoraMigrateError
from lora_migrate.io._common import OutOfSpace, is_out_of_space, oneline, write_errors


def save_bin(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """``torch.save`` a plain ``{str: Tensor}`` dict of compact CPU tensors to ``path`` and fsync it."""
    path = Path(path)
    if not isinstance(tensors, dict):
        raise ValueError("save_bin expects a dict of str to torch.Tensor")
    plain = {}
    for key, t in tensors.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"save_bin: entry {key!r} is not a str -> torch.Tensor pair")
        plain[key] = _compact(t)
    try:
        with write_errors(path), open(path, "wb") as f:
            torch.save(plain, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        if path.is_file():  # never leave a half-written checkpoint (nor unlink a device node)
            path.unlink(missing_ok=True)
        if not isinstance(exc, RuntimeError):
            raise
        # torch's zip writer reports failed writes as RuntimeError
        if is_out_of_space(exc):
            raise OutOfSpace(f"no space left on device while writing {path}") from exc
        raise LoraMigrateError(f"{path}: cannot write: {oneline(exc)}") from exc


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor owning exactly its data: ``t`` itself if it already does, else a contiguous clone."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if type(t) is not torch.Tensor:  # subclasses (e.g. Parameter) are not weights_only-safe in general
        t = t.as_subclass(torch.Tensor)
    owns = (
        t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        and not t.is_conj()
        and not t.is_neg()
    )
    return t if owns else t.clone(memory_format=torch.contiguous_format).resolve_conj().resolve_neg()
