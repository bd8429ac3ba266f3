"""Lazy, validated reading of tensor files: ``.safetensors`` and PyTorch ``.bin`` checkpoints.

``open_tensors(path)`` returns a :class:`TensorFile` that lists keys and shapes without loading data and loads
one tensor at a time. Safetensors headers are parsed and checked here, strictly and before safetensors sees the
file, so that a malformed file ends in a one-line :class:`LoraMigrateError` naming the file, never a traceback.
Data then comes from ``safetensors.safe_open`` (zero-copy mmap). ``.bin`` files are read with
``torch.load(weights_only=True)``, mmapped when the file is in the zip format; anything in the pickle other
than tensors is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch

from lora_migrate.errors import LoraMigrateError
from lora_migrate.io._common import DTYPES, MAX_HEADER_SIZE, UNSUPPORTED_CODES, oneline

_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class TensorMeta:
    """Name, torch shape, dtype and byte size of one stored tensor."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


class TensorFile:
    """An open tensor file. Use :func:`open_tensors`; close it (or use ``with``) when done."""

    def __init__(self, path: Path, fmt: str, metas: dict[str, TensorMeta], metadata, handle, tensors):
        self.path = path
        self.format = fmt
        self.metadata: dict[str, str] | None = metadata
        self._metas = metas
        self._handle = handle  # safe_open handle (safetensors)
        self._tensors = tensors  # loaded dict (bin)
        self._closed = False

    def keys(self) -> list[str]:
        """Tensor names in file order (data-offset order for safetensors, pickle order for .bin)."""
        return list(self._metas)

    def __contains__(self, key: object) -> bool:
        return key in self._metas

    def __len__(self) -> int:
        return len(self._metas)

    def meta(self, key: str) -> TensorMeta:
        """Shape/dtype/size of ``key`` without loading its data."""
        try:
            return self._metas[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {_short(key)}") from None

    def get(self, key: str) -> torch.Tensor:
        """Load one tensor (CPU; a zero-copy mmap view where the format allows)."""
        if self._closed:
            raise ValueError(f"{self.path}: file is closed")
        self.meta(key)
        if self._tensors is not None:
            return self._tensors[key]
        try:
            return self._handle.get_tensor(key)
        except (safetensors.SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise LoraMigrateError(f"{self.path}: cannot read tensor {_short(key)}: {oneline(exc)}") from exc

    def close(self) -> None:
        """Release the file. Tensors already returned by :meth:`get` stay valid."""
        if not self._closed:
            self._closed = True
            if self._handle is not None:
                self._handle.__exit__(None, None, None)
            self._handle = self._tensors = None

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorFile({str(self.path)!r}, format={self.format!r}, tensors={len(self._metas)})"


def open_tensors(path: str | os.PathLike) -> TensorFile:
    """Open a ``.safetensors`` or ``.bin`` file for lazy reading; any problem is a one-line LoraMigrateError.

    The format comes from the suffix (``.safetensors``; ``.bin``/``.pt``/``.pth``), else from the content.
    """
    path = Path(path)
    try:
        st = path.stat()
        with open(path, "rb") as f:
            head = f.read(9)
    except FileNotFoundError:
        raise LoraMigrateError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LoraMigrateError(f"{path} is a directory, expected a .safetensors or .bin file") from None
    except OSError as exc:
        raise LoraMigrateError(f"{path}: cannot read: {exc.strerror or oneline(exc)}") from None
    if st.st_size == 0:
        raise LoraMigrateError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    if suffix == ".safetensors" or (suffix not in (".bin", ".pt", ".pth") and head[8:9] == b"{"):
        return _open_safetensors(path, st.st_size)
    return _open_bin(path, head)


# ---------------------------------------------------------------------------------------------- safetensors


def _open_safetensors(path: Path, size: int) -> TensorFile:
    metas, metadata = read_safetensors_header(path, size)
    try:
        handle = safetensors.safe_open(str(path), framework="pt")
    except (safetensors.SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise LoraMigrateError(f"{path}: not a valid safetensors file: {oneline(exc)}") from exc
    return TensorFile(path, "safetensors", metas, metadata, handle, None)


def read_safetensors_header(
    path: str | os.PathLike, size: int | None = None
) -> tuple[dict[str, TensorMeta], dict[str, str] | None]:
    """Parse and strictly validate a safetensors header: ``({key: TensorMeta} in data order, __metadata__)``.

    Checks what the Rust reader checks (and duplicate keys, which it silently collapses): header length within
    the file and under 100 MB, UTF-8, JSON object, known dtypes, non-negative integer shapes, each tensor's
    byte range equal to shape x dtype size, and ranges that tile the data section exactly (no overlap, no
    hole, no trailing bytes).
    """

    path = Path(path)

    def bad(reason: str) -> LoraMigrateError:
        return LoraMigrateError(f"{path}: not a valid safetensors file: {reason}")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size if size is None else size
            if size < 8:
                raise bad(f"file is {size} bytes, too short for the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_SIZE:
                raise bad(f"header length {n} is over the {MAX_HEADER_SIZE}-byte limit")
            if n > size - 8:
                raise bad(f"header length {n} runs past the end of the file ({size} bytes; truncated?)")
            raw = f.read(n)
    except OSError as exc:
        raise LoraMigrateError(f"{path}: cannot read: {exc.strerror or oneline(exc)}") from None
    if len(raw) != n:
        raise bad("file shrank while being read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"header is not valid UTF-8 (byte {exc.start})") from None

    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _Duplicate as exc:
        raise bad(f"header has duplicate key {_short(exc.args[0])}") from None
    except json.JSONDecodeError as exc:
        raise bad(f"header is not valid JSON ({exc.msg} at char {exc.pos})") from None
    except (ValueError, RecursionError) as exc:
        raise bad(f"header is not valid JSON ({oneline(exc)})") from None
    if not isinstance(header, dict):
        raise bad(f"header is a JSON {type(header).__name__}, not an object")

    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise bad("__metadata__ must be an object of string values")

    def is_uint(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    entries = []
    for key, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"entry {_short(key)} is not an object")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if isinstance(code, str) and code in UNSUPPORTED_CODES:
            raise bad(f"tensor {_short(key)} has dtype {code}, which torch cannot represent")
        if not isinstance(code, str) or code not in DTYPES:
            raise bad(f"tensor {_short(key)} has unknown dtype {_short(code)}")
        if not isinstance(shape, list) or not all(is_uint(d) for d in shape):
            raise bad(f"tensor {_short(key)} has invalid shape {_short(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_uint(o) for o in offsets)):
            raise bad(f"tensor {_short(key)} has invalid data_offsets {_short(offsets)}")
        begin, end = offsets
        if end < begin:
            raise bad(f"tensor {_short(key)} has data_offsets {offsets} that end before they begin")
        dt = DTYPES[code]
        numel = 1
        for d in shape:
            numel *= d
        bits = numel * dt.bits
        if bits % 8 or end - begin != bits // 8:
            need = f"{bits // 8} bytes" if bits % 8 == 0 else f"{bits} bits (not whole bytes)"
            held = end - begin
            raise bad(f"tensor {_short(key)} ({code} {_short(shape)}) needs {need}, data_offsets {offsets} hold {held}")
        torch_shape = tuple(shape)
        if code == "F4":  # two F4 values per torch float4_e2m1fn_x2 element
            if not shape or shape[-1] % 2:
                raise bad(f"tensor {_short(key)} (F4 {_short(shape)}) needs an even last dimension")
            torch_shape = (*shape[:-1], shape[-1] // 2)
        entries.append((begin, end, TensorMeta(key, torch_shape, dt.torch_dtype, end - begin)))

    entries.sort(key=lambda e: (e[0], e[1]))  # stable: equal ranges (empty tensors) keep header order
    pos, prev = 0, None
    for begin, end, m in entries:
        if begin < pos:
            raise bad(f"tensor {_short(m.key)} data [{begin}, {end}) overlaps tensor {_short(prev)}")
        if begin > pos:
            raise bad(f"{begin - pos}-byte hole in the data section before tensor {_short(m.key)}")
        pos, prev = end, m.key
    data_len = size - 8 - n
    if pos > data_len:
        raise bad(f"tensor data needs {pos} bytes but the file holds {data_len} after the header (truncated?)")
    if pos < data_len:
        raise bad(f"{data_len - pos} unexpected trailing bytes after the last tensor")
    return {m.key: m for _, _, m in entries}, metadata


# -------------------------------------------------------------------------------------------------- .bin


def _open_bin(path: Path, head: bytes) -> TensorFile:
    # torch can mmap only the zip format; legacy (pre-1.6 / _use_new_zipfile_serialization=False) files are
    # plain pickles and are loaded whole. Checking the magic is the same test torch.load makes internally.
    mmap = head.startswith(_ZIP_MAGIC)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # torch wraps every weights-only unpickler error (also plain corruption) in one long message; the
        # original is kept as __context__. Refusals name a forbidden global or object kind.
        inner = str(exc.__context__ or exc)
        if re.search(r"GLOBAL |Can only |Only persistent_load|must be imported", inner):
            found = re.search(r"GLOBAL (\S+)", inner)
            what = f" ({found.group(1)})" if found else f" ({oneline(inner)[:120]})"
            raise LoraMigrateError(
                f"{path}: refused: the pickle holds something other than tensors{what} (read with "
                "weights_only=True); if you trust the file, re-save it as a plain dict of tensors"
            ) from None
        raise LoraMigrateError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {oneline(inner)}"
        ) from None
    except MemoryError:
        raise
    except Exception as exc:  # torch.load raises EOFError, IndexError, KeyError, RuntimeError, ... on bad files
        raise LoraMigrateError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {oneline(exc)}"
        ) from None
    if not isinstance(obj, dict):
        raise LoraMigrateError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
    metas = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise LoraMigrateError(f"{path}: expected string keys, found {_short(key)}")
        if isinstance(value, dict):
            raise LoraMigrateError(f"{path}: key {_short(key)} holds a nested dict; expected a flat dict of tensors")
        if not isinstance(value, torch.Tensor):
            raise LoraMigrateError(f"{path}: key {_short(key)} holds a {type(value).__name__} value, not a tensor")
        metas[key] = TensorMeta(key, tuple(value.shape), value.dtype, value.numel() * value.element_size())
    return TensorFile(path, "bin", metas, None, None, obj)


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise _Duplicate(k)
        obj[k] = v
    return obj


def _no_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _short(value, limit: int = 80) -> str:
    """repr() cut to ``limit`` characters, for messages about untrusted names and values."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
