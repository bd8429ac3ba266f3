"""The open tensor file every reader returns: keys, shapes and dtypes without loading data, then one tensor at a
time into fresh memory (no mmap, so resident memory stays about one tensor during a pass over the file)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_migrate.errors import LoraMigrateError
from lora_migrate.io._common import oneline

STREAM_CHUNK = 4 << 20  # bytes per piece of TensorFile.stream: big reads, and a piece stays in the CPU cache


@dataclass(frozen=True)
class TensorMeta:
    """Name, torch shape, dtype and byte size of one stored tensor."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    offset: int = field(default=-1, compare=False)  # absolute file offset of the data (safetensors), -1 where the format has none


class TensorFile:
    """An open tensor file. Use :func:`open_tensors`; close it (or use ``with``) when done."""

    def __init__(self, path: Path, fmt: str, metas: dict[str, TensorMeta], metadata, handle, tensors):
        self.path = path
        self.format = fmt
        self.metadata: dict[str, str] | None = metadata
        self._metas = metas
        self._handle = handle  # safe_open handle (safetensors)
        self._tensors = tensors  # loaded dict (bin)
        self._buffer = None  # reused by stream()
        self._pool = StoragePool()
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
            raise KeyError(f"{self.path}: no tensor named {short_repr(key)}") from None

    def get(self, key: str) -> torch.Tensor:
        """Load one tensor into CPU memory that nothing else uses.

        Data is read at the offset the validated header gives (``.bin``: the storage's zip record), not through
        an mmap, so that a pass over a large file keeps about one tensor resident, not the file's pages. The
        memory of tensors returned earlier and since dropped is reused (:class:`StoragePool`).
        """
        if self._closed:
            raise ValueError(f"{self.path}: file is closed")
        m = self.meta(key)
        if self._tensors is not None:
            return self._tensors[key]
        storage = read_span(self._handle, self.path, key, m.offset, m.nbytes, self._pool)
        return torch.empty(0, dtype=m.dtype).set_(storage, 0, m.shape)

    def stream(self, key: str, chunk: int = STREAM_CHUNK):
        """The bytes of ``key`` as :meth:`get` would hold them (contiguous, native order), in consecutive pieces of
        at most ``chunk`` bytes (a multiple of 8), without building the tensor: numpy uint8 arrays that are views
        of one reused buffer, each valid until the next is asked for. A tensor whose bytes are not one span of the
        file (a ``.bin`` view into a bigger storage, a ``.bin`` loaded by ``torch.load``) comes as one piece
        taken from :meth:`get`."""
        import numpy as np

        if self._closed:
            raise ValueError(f"{self.path}: file is closed")
        m = self.meta(key)
        span = None
        if self._tensors is None:
            span = (self._handle, m.offset)
        elif hasattr(self._tensors, "span"):  # a .bin read lazily (bin_reader._LazyBinTensors)
            span = self._tensors.span(key)
        if span is None:
            yield self.get(key).contiguous().reshape(-1).view(torch.uint8).numpy()
            return
        f, start = span
        if self._buffer is None or self._buffer.size < min(chunk, m.nbytes):
            self._buffer = np.empty(min(chunk, max(m.nbytes, 8)), dtype=np.uint8)
        step = self._buffer.size - self._buffer.size % 8
        for pos in range(0, m.nbytes, step):
            n = min(step, m.nbytes - pos)
            yield _read_into(f, self.path, key, start + pos, self._buffer[:n])
        if m.nbytes == 0:
            yield self._buffer[:0]

    def close(self) -> None:
        """Release the file. Tensors already returned by :meth:`get` stay valid."""
        if not self._closed:
            self._closed = True
            if self._handle is not None:
                self._handle.close()
            if hasattr(self._tensors, "close"):  # a .bin read lazily holds its file open
                self._tensors.close()
            self._handle = self._tensors = self._buffer = self._pool = None

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorFile({str(self.path)!r}, format={self.format!r}, tensors={len(self._metas)})"



def _read_into(f, path: Path, name: str, start: int, buf):
    """Fill ``buf`` (a writable byte buffer) with the bytes at ``start`` of the open file ``f`` and return it (a
    read may return short, e.g. at 2 GiB on Linux, so it loops)."""
    view = memoryview(buf).cast("B")
    done = 0
    try:
        f.seek(start)
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                break
            done += got
    except OSError as exc:
        raise LoraMigrateError(f"{path}: cannot read tensor {short_repr(name)}: {exc.strerror or oneline(exc)}") from exc
    if done != len(view):
        raise LoraMigrateError(f"{path}: tensor {short_repr(name)} is cut short (file truncated?)")
    return buf


_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


class StoragePool:
    """Storages handed out by a file's :meth:`TensorFile.get`, reused once no tensor uses them any more.

    A pass over a file reads tensors of a few recurring sizes, one module at a time. Fresh storages would each be
    page-faulted in anew (the allocator hands big blocks back to the OS); this measured 0.4 s of a 1.1 GB
    conversion. A storage is reused only when its use count says that the pool's own reference is the last one
    (a tensor, a view or a numpy array of it keeps it out of reach). At most ``BUDGET`` bytes are held; beyond
    that, and where torch does not expose use counts, storages are simply fresh.
    """

    BUDGET = 64 << 20

    def __init__(self) -> None:
        self._held: dict[int, list[torch.UntypedStorage]] = {}
        self._bytes = 0

    def take(self, nbytes: int) -> torch.UntypedStorage:
        for s in self._held.get(nbytes, ()):
            if _USE_COUNT(s._cdata) == 1:
                return s
        s = torch.UntypedStorage(nbytes)
        if _USE_COUNT is not None and self._bytes + nbytes <= self.BUDGET:
            self._held.setdefault(nbytes, []).append(s)
            self._bytes += nbytes
        return s


def read_span(f, path: Path, name: str, start: int, nbytes: int, pool: StoragePool) -> torch.UntypedStorage:
    """``nbytes`` bytes at ``start`` of the open file ``f``, read into a CPU storage from ``pool`` that nothing
    else uses (no mmap)."""
    storage = pool.take(nbytes)
    if nbytes:
        _read_into(f, path, name, start, (ctypes.c_ubyte * nbytes).from_address(storage.data_ptr()))
    return storage


    pass



def short_repr(value, limit: int = 80) -> str:
    """repr() cut to ``limit`` characters, for messages about untrusted names and values."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
