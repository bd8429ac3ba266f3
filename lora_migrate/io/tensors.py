"""Lazy, validated reading of tensor files: ``.safetensors`` and PyTorch ``.bin`` checkpoints.

``open_tensors(path)`` returns a :class:`TensorFile` that lists keys and shapes without loading data and loads
one tensor at a time. Safetensors files are validated by the safetensors library (``safe_open``) before anything
is read at their offsets, so that a malformed file ends in a one-line :class:`LoraMigrateError` naming the file,
never a traceback.
Data is then read tensor by tensor at the header's offsets into fresh memory (no mmap, so resident memory
stays about one tensor during a pass over the file). ``.bin`` files: ``data.pkl`` is read with torch's own
weights-only unpickler (anything other than tensors is refused) and each storage's zip record is read on
demand in the same way; legacy and unusual files fall back to ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import pickle
import re
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_migrate.errors import LoraMigrateError
from lora_migrate.io._common import DTYPES, oneline

_ZIP_MAGIC = b"PK\x03\x04"
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
        self._pool = _StoragePool()
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
        """Load one tensor into CPU memory that nothing else uses.

        Data is read at the offset the validated header gives (``.bin``: the storage's zip record), not through
        an mmap, so that a pass over a large file keeps about one tensor resident, not the file's pages. The
        memory of tensors returned earlier and since dropped is reused (:class:`_StoragePool`).
        """
        if self._closed:
            raise ValueError(f"{self.path}: file is closed")
        m = self.meta(key)
        if self._tensors is not None:
            return self._tensors[key]
        storage = _read_span(self._handle, self.path, key, m.offset, m.nbytes, self._pool)
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
        elif isinstance(self._tensors, _LazyBinTensors):
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
            if isinstance(self._tensors, _LazyBinTensors):
                self._tensors.close()
            self._handle = self._tensors = self._buffer = self._pool = None

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
            raise LoraMigrateError(f"{path}: not a valid safetensors file: tensor {_short(key)} has dtype {code}, "
                                   "which torch cannot represent")
        torch_shape = tuple(shape)
        if code == "F4":  # two F4 values per torch float4_e2m1fn_x2 element
            if not shape or shape[-1] % 2:
                raise LoraMigrateError(f"{path}: not a valid safetensors file: tensor {_short(key)} "
                                       f"(F4 {_short(shape)}) needs an even last dimension")
            torch_shape = (*shape[:-1], shape[-1] // 2)
        entries.append((begin, end, TensorMeta(key, torch_shape, DTYPES[code].torch_dtype, end - begin,
                                               8 + n + begin)))
    entries.sort(key=lambda e: (e[0], e[1]))  # stable: equal ranges (empty tensors) keep header order
    return {m.key: m for _, _, m in entries}, metadata


def _explain(path: Path, exc: Exception) -> str:
    """safetensors' reason, without its fixed prefix, and for a file that is too short or too long the sizes."""
    reason = oneline(str(exc).removeprefix("Error while deserializing header: "))
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
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


# -------------------------------------------------------------------------------------------------- .bin


def _open_bin(path: Path, head: bytes) -> TensorFile:
    # Zip-format files are read lazily, one storage at a time (_open_bin_lazy); torch.load below takes what that
    # reader leaves to it. torch can mmap only the zip format; legacy (pre-1.6 / _use_new_zipfile_serialization=
    # False) files are plain pickles and are loaded whole. Checking the magic is the same test torch.load makes.
    mmap = head.startswith(_ZIP_MAGIC)
    if mmap:
        lazy = _open_bin_lazy(path)
        if lazy is not None:
            return lazy
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
        detail = _first_sentence(oneline(exc))
        if mmap and not zipfile.is_zipfile(path):  # torch's own words are then e.g. "[Errno 22] Invalid argument"
            detail = "the zip archive has no end record: the file is cut short (an interrupted download?)"
        raise LoraMigrateError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {detail}") from None
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


# Zip-format .bin read one storage at a time. torch.load(mmap=True) maps the whole file, and as a conversion
# touches every tensor the mapped pages pile up in the process's resident memory (file-backed, but counted), so
# peak RSS grows with the file. Here data.pkl is unpickled by torch's own weights-only unpickler (the very class
# torch.load(weights_only=True) uses, so exactly the same pickles are allowed) with storages on the meta device:
# that yields every tensor's storage key, offset, shape, stride and dtype without any data. Each storage's bytes
# are then located in the zip (stdlib zipfile + the record's local header) and read on demand with readinto into
# freshly allocated memory. Anything unusual -- not a flat dict of plain strided tensors, a pickle the
# unpickler refuses, a compressed record, a big-endian file, a torch without the private unpickler -- returns
# None and _open_bin goes the torch.load way, so those files keep their former behaviour and error messages.

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # zip local file header: signature, 22 bytes, name and extra lengths


def _open_bin_lazy(path: Path) -> TensorFile | None:
    """A lazily read :class:`TensorFile` for a zip-format ``.bin``, or ``None`` to fall back to ``torch.load``.

    Raises :class:`LoraMigrateError` only for damage the torch.load path would not report clearly (a data
    record of the wrong size, or one running past the end of the file).
    """
    if sys.byteorder != "little":
        return None
    try:
        from torch._weights_only_unpickler import Unpickler
    except ImportError:
        return None
    try:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 -- owned by _LazyBinTensors, closed by TensorFile.close
    except OSError:
        return None
    try:
        plan = _plan_lazy_bin(path, f, Unpickler)
    except LoraMigrateError:
        f.close()
        raise
    except MemoryError:
        f.close()
        raise
    except Exception:  # anything the unpickler or zipfile raise: let torch.load judge (and word) it
        plan = None
    if plan is None:
        f.close()
        return None
    metas, views, spans = plan
    return TensorFile(path, "bin", metas, None, None, _LazyBinTensors(path, f, views, spans))


def _plan_lazy_bin(path: Path, f, unpickler_class):
    """``(metas, views, spans)`` for :class:`_LazyBinTensors`, or ``None`` where torch.load must decide."""
    size = os.fstat(f.fileno()).st_size
    with zipfile.ZipFile(f) as zf:  # given a file object, ZipFile leaves it open
        infos = zf.infolist()
        names = [info.filename for info in infos]
        if not names or "/" not in names[0] or len(set(names)) != len(names):
            return None
        # torch's reader takes the archive folder from the first record's name
        prefix = names[0].split("/", 1)[0] + "/"
        records = {info.filename[len(prefix) :]: info for info in infos if info.filename.startswith(prefix)}
        if "data.pkl" not in records or "constants.pkl" in records:  # constants.pkl: TorchScript, refused
            return None
        if "version" not in records and ".data/version" not in names:
            return None
        # No record means little-endian (torch's default). A big-endian file is left to torch.load, which
        # byteswaps it; an unknown value too, which torch.load refuses.
        if "byteorder" in records and zf.read(records["byteorder"]) != b"little":
            return None
        pkl = zf.read(records["data.pkl"])

    storages: dict[str, torch.storage.TypedStorage] = {}
    key_of: dict[int, str] = {}  # untyped storage's _cdata -> storage key

    def persistent_load(saved_id):
        # torch.serialization._load's persistent_load, minus the data: a meta storage of the right byte size
        if not isinstance(saved_id, tuple) or len(saved_id) != 5:
            raise pickle.UnpicklingError(f"unexpected persistent id {_short(saved_id)}")
        typename, storage_type, key, _location, numel = saved_id
        if isinstance(typename, bytes):
            typename = typename.decode("ascii")
        if typename != "storage" or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"unexpected persistent id {_short(saved_id)}")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        if key not in storages:
            untyped = torch.UntypedStorage(numel * dtype.itemsize, device="meta")
            storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
            key_of[untyped._cdata] = key
        return storages[key]

    # Sparse tensors register themselves for validation at the end of torch.load; take back any meta ones added
    # here, so that they cannot trouble a later torch.load (such a file falls back to torch.load anyway).
    pending = getattr(torch._utils, "_sparse_tensors_to_validate", None)
    mark = len(pending) if isinstance(pending, list) else None
    try:
        unpickler = unpickler_class(io.BytesIO(pkl), encoding="utf-8")  # as torch.load(weights_only=True)
        unpickler.persistent_load = persistent_load
        obj = unpickler.load()
    finally:
        if mark is not None:
            del pending[mark:]

    if not isinstance(obj, dict):
        return None
    metas: dict[str, TensorMeta] = {}
    views: dict[str, tuple] = {}
    for name, t in obj.items():
        if not isinstance(name, str) or type(t) not in (torch.Tensor, torch.nn.Parameter):
            return None
        if t.layout != torch.strided or t.is_quantized or t.device.type != "meta":
            return None
        key = key_of.get(t.untyped_storage()._cdata)
        if key is None:
            return None
        metas[name] = TensorMeta(name, tuple(t.shape), t.dtype, t.numel() * t.element_size())
        views[name] = (key, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)

    spans: dict[str, tuple[int, int]] = {}  # storage key -> (data start in the file, byte size)
    for key in dict.fromkeys(v[0] for v in views.values()):
        nbytes = storages[key]._untyped_storage.nbytes()
        info = records.get(f"data/{key}")
        if info is None:
            raise LoraMigrateError(
                f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): record data/{key} is missing"
            )
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        if info.file_size != nbytes or info.compress_size != nbytes:
            raise LoraMigrateError(
                f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): record data/{key} holds "
                f"{info.file_size} bytes, its tensors need {nbytes}"
            )
        f.seek(info.header_offset)
        raw = f.read(_LOCAL_HEADER.size)
        if len(raw) != _LOCAL_HEADER.size:
            return None
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
        if signature != _ZIP_MAGIC:
            return None
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if start + nbytes > size:
            raise LoraMigrateError(
                f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): record data/{key} runs past "
                "the end of the file"
            )
        spans[key] = (start, nbytes)
    return metas, views, spans


class _LazyBinTensors:
    """``name -> tensor`` for :class:`TensorFile`: each get reads its storage's bytes into fresh memory.

    The last storage read is kept, so views of one storage (a fused matrix saved as slices) read it once;
    tensors returned for views of one storage share it, as they would from ``torch.load``.
    """

    def __init__(self, path: Path, file, views: dict[str, tuple], spans: dict[str, tuple[int, int]]):
        self._path = path
        self._file = file
        self._views = views
        self._spans = spans
        self._last: tuple[str, torch.UntypedStorage] | None = None
        self._pool = _StoragePool()

    def __getitem__(self, name: str) -> torch.Tensor:
        key, offset, shape, stride, dtype = self._views[name]
        storage = self._storage(key, name)
        return torch.empty(0, dtype=dtype).set_(storage, offset, shape, stride)

    def _storage(self, key: str, name: str) -> torch.UntypedStorage:
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        self._last = None  # let the previous storage go before allocating the next
        start, nbytes = self._spans[key]
        storage = _read_span(self._file, self._path, name, start, nbytes, self._pool)
        self._last = (key, storage)
        return storage

    def span(self, name: str) -> tuple[object, int] | None:
        """(file, start) when tensor ``name`` is its whole storage in contiguous order, else None."""
        key, offset, shape, stride, dtype = self._views[name]
        start, nbytes = self._spans[key]
        numel = 1
        for d in shape:
            numel *= d
        if offset != 0 or numel * dtype.itemsize != nbytes or tuple(stride) != _contiguous(shape):
            return None
        return self._file, start

    def close(self) -> None:
        self._last = self._pool = None
        self._file.close()


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``, as torch reports them."""
    return torch.empty(shape, device="meta").stride()


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
        raise LoraMigrateError(f"{path}: cannot read tensor {_short(name)}: {exc.strerror or oneline(exc)}") from exc
    if done != len(view):
        raise LoraMigrateError(f"{path}: tensor {_short(name)} is cut short (file truncated?)")
    return buf


_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


class _StoragePool:
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


def _read_span(f, path: Path, name: str, start: int, nbytes: int, pool: _StoragePool) -> torch.UntypedStorage:
    """``nbytes`` bytes at ``start`` of the open file ``f``, read into a CPU storage from ``pool`` that nothing
    else uses (no mmap)."""
    storage = pool.take(nbytes)
    if nbytes:
        _read_into(f, path, name, start, (ctypes.c_ubyte * nbytes).from_address(storage.data_ptr()))
    return storage


    pass


def _first_sentence(text: str) -> str:
    """torch's zip reader appends several sentences of advice to its error; keep the first."""
    return text.split(". ", 1)[0] if text.startswith("PytorchStreamReader") else text


def _short(value, limit: int = 80) -> str:
    """repr() cut to ``limit`` characters, for messages about untrusted names and values."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
