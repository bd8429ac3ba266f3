"""Safetensors files: validated by the safetensors library, then read at the header's offsets."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from lora_migrate.errors import LoraMigrateError
from lora_migrate.io._common import DTYPES, oneline
from lora_migrate.io.tensor_file import TensorFile, TensorMeta, short_repr


def _open_safetensors(path: Path, size: int) -> TensorFile:
    metas, metadata = read_safetensors_header(path, size)
    try:
        handle = open(path, "rb", buffering=0)  # noqa: SIM115 -- closed by TensorFile.close()
    except OSError as exc:
        raise LoraMigrateError(f"{path}: cannot read: {exc.strerror or oneline(exc)}") from exc
    return TensorFile(path, "safetensors", metas, metadata, handle, None)


def read_safetensors_header(
    path: str | os.PathLike, size: int | None = None
) -> tuple[dict[str, TensorMeta], dict[str, str] | None]:
    """Validate a safetensors file with the safetensors library and return ``({key: TensorMeta} in data order,
    __metadata__)``.

    ``safe_open`` checks everything a reader must trust before it reads at the header's offsets: the header length
    (within the file, under 100 MB), UTF-8, JSON, known dtypes, non-negative shapes, each tensor's byte range equal
    to shape × dtype size, and ranges that tile the data section exactly (no overlap, hole or trailing byte). Its
    error becomes one line naming the file, with the sizes that explain a truncated download. Only then is the
    header read here, for the data offsets the streaming reader needs (safe_open does not expose them)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(path, "pt"):
            pass
    except SafetensorError as exc:
        raise LoraMigrateError(f"{path}: not a valid safetensors file: {_explain(path, exc)}") from None
    except OSError as exc:
        raise LoraMigrateError(f"{path}: cannot read: {exc.strerror or oneline(exc)}") from None
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            raw = f.read(n)
    except OSError as exc:
        raise LoraMigrateError(f"{path}: cannot read: {exc.strerror or oneline(exc)}") from None
    header = json.loads(raw)
    metadata = header.pop("__metadata__", None)
    entries = []
    for key, info in header.items():
        code, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if code not in DTYPES:
            raise LoraMigrateError(f"{path}: not a valid safetensors file: tensor {short_repr(key)} has dtype {code}, "
                                   "which torch cannot represent")
        torch_shape = tuple(shape)
        if code == "F4":  # two F4 values per torch float4_e2m1fn_x2 element
            if not shape or shape[-1] % 2:
                raise LoraMigrateError(f"{path}: not a valid safetensors file: tensor {short_repr(key)} "
                                       f"(F4 {short_repr(shape)}) needs an even last dimension")
            torch_shape = (*shape[:-1], shape[-1] // 2)
        entries.append((begin, end, TensorMeta(key, torch_shape, DTYPES[code].torch_dtype, end - begin,
                                               8 + n + begin)))
    entries.sort(key=lambda e: (e[0], e[1]))  # stable: equal ranges (empty tensors) keep header order
    return {m.key: m for _, _, m in entries}, metadata


def _explain(path: Path, exc: Exception) -> str:
    """safetensors' reason, without its fixed prefix, and for a file that is too short or too long the sizes."""
    reason = oneline(str(exc).removeprefix("Error while deserializing header: "))
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    if reason.startswith("invalid offset for tensor"):  # which tensor it names depends on a hash map's order
        return _first_bad_range(path) or reason
    if "not fully covered" not in reason and "invalid header length" not in reason:
        return reason
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return f"header length {n} runs past the end of the file ({size} bytes; truncated?)"
            header = json.loads(f.read(n))
        need = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return reason
    held = size - 8 - n
    if need > held:
        return f"tensor data needs {need} bytes but the file holds {held} after the header (truncated?)"
    if need < held:
        return f"{held - need} unexpected trailing bytes after the last tensor"
    return reason


def _first_bad_range(path: Path) -> str | None:
    """The first tensor, in data order, whose byte range does not start where the previous one ended."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        ranges = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in header.items()
                        if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return None
    pos = 0
    for begin, end, key in ranges:
        if end < begin:
            return f"tensor {short_repr(key)} data_offsets [{begin}, {end}] end before they begin"
        if begin != pos:
            what = "overlaps the tensor before it" if begin < pos else f"leaves a {begin - pos}-byte hole before it"
            return f"tensor {short_repr(key)} data_offsets [{begin}, {end}] {what}"
        pos = end
    return None
