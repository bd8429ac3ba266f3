"""Streaming safetensors writer: peak memory is one tensor, not the whole state dict.

``safetensors.torch.save_file`` needs every tensor in memory at once. :class:`SafetensorsWriter` instead takes
the plan first (names, dtypes, shapes), writes the header, then accepts tensors one by one in plan order and
writes their bytes straight from the tensor's memory.

Format written (identical to safetensors' own serializer): u64 little-endian header length; compact JSON
header ``{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets"}, ...}`` with entries in data order,
space-padded to a multiple of 8 bytes; then the tensors' bytes, contiguous, in plan order. Given the plan in
:func:`safetensors_order` and at most one metadata key, the file is byte-identical to ``save_file``'s (with two
or more metadata keys save_file's order of them is random per call: it serializes a Rust ``HashMap``).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from lora_migrate.errors import LoraMigrateError
from lora_migrate.io._common import BY_TORCH, MAX_HEADER_SIZE, PlannedWriter, WriteBehind, fault_point, write_errors


def safetensors_order(items: Iterable[tuple[str, torch.dtype]]) -> list[str]:
    """Names in the order ``save_file`` lays tensors out: dtype by descending Rust enum rank, then name."""
    return [name for name, dtype in sorted(items, key=lambda it: (-BY_TORCH[it[1]].rank, it[0]))]


class SafetensorsWriter(PlannedWriter):
    """Write a safetensors file in two phases: ``add`` every tensor, ``write_header``, ``write`` each in order.

    As a context manager, an exception (or an incomplete file at exit) closes and deletes the partial file.
    """

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        super().__init__()
        if sys.byteorder != "little":
            raise LoraMigrateError("writing safetensors on a big-endian machine is not supported")
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            raise ValueError("metadata must be a dict of str to str")
        self.path = Path(path)
        self.metadata = None if metadata is None else dict(metadata)
        self._file = None
        self._started = False
        self._done = False

    def _check_dtype(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        if name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"tensor name {name!r} is not encodable as UTF-8") from None
        if dtype not in BY_TORCH:
            raise ValueError(f"tensor {name!r}: safetensors cannot store dtype {dtype}")
        if BY_TORCH[dtype].code == "F4" and not shape:
            raise ValueError(f"tensor {name!r}: float4_e2m1fn_x2 needs at least one dimension")

    def header_bytes(self) -> bytes:
        """The 8-byte length plus padded JSON header for the current plan (data laid out in plan order)."""
        header: dict = {}
        if self.metadata is not None:
            header["__metadata__"] = self.metadata
        begin = 0
        for name, (dtype, shape, nbytes) in self._plan.items():
            if BY_TORCH[dtype].code == "F4":  # the header counts F4 values, two per float4_e2m1fn_x2 element
                shape = (*shape[:-1], shape[-1] * 2)
            header[name] = {"dtype": BY_TORCH[dtype].code, "shape": list(shape),
                            "data_offsets": [begin, begin + nbytes]}
            begin += nbytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % 8)
        if len(text) > MAX_HEADER_SIZE:
            raise LoraMigrateError(f"{self.path}: safetensors header would be {len(text)} bytes, over the limit")
        return struct.pack("<Q", len(text)) + text

    def write_header(self) -> None:
        """Create the file and write the header; the plan is frozen from here on."""
        if self._started or self._done:
            raise ValueError("write_header() called twice")
        header = self.header_bytes()
        self._started = True
        with write_errors(self.path):
            self._file = open(self.path, "wb")
            self._file.write(header)
        self._behind = WriteBehind(self._file.fileno())
        self._end = len(header)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor; its name, dtype and shape must match the plan exactly."""
        i = self._take_next(name, tensor)
        nbytes = self._plan[self._order[i]][2]
        data = _raw_bytes(tensor)
        if data.nbytes != nbytes:  # cannot happen for a strided tensor; guards the layout invariant
            raise ValueError(f"tensor {name!r}: {data.nbytes} bytes, planned {nbytes}")
        with write_errors(self.path):
            fault_point("write")
            self._file.write(data)
            self._end += data.nbytes
            self._behind.wrote(self._end, self._file.flush)
        self._next += 1

    def close(self) -> None:
        """Flush, fsync and close. Raises ValueError (and deletes the file) if the plan was not fully written."""
        if self._done:
            return
        self._check_complete()
        try:
            with write_errors(self.path):
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
        except BaseException:
            self.abort()
            raise
        self._file, self._done = None, True

    def abort(self) -> None:
        """Close without finishing and delete the partial file."""
        f, self._file, self._done = self._file, None, True
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
            if self.path.is_file():  # never unlink a device node such as /dev/full
                self.path.unlink(missing_ok=True)


def _raw_bytes(tensor: torch.Tensor):
    """The tensor's bytes as a flat uint8 numpy array; no copy for a contiguous CPU tensor."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    # reshape(-1) first: view() to a narrower dtype is refused for 0-d tensors. bf16/fp8 have no numpy dtype,
    # so go through uint8.
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()
