"""PyTorch ``.bin`` checkpoints: ``data.pkl`` is read with torch's own weights-only unpickler (anything other
than tensors is refused) and each storage's zip record is read on demand; legacy and unusual files fall back to
``torch.load(weights_only=True)``."""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import sys
import zipfile
from pathlib import Path

import torch

from lora_migrate.errors import LoraMigrateError
from lora_migrate.io._common import oneline
from lora_migrate.io.tensor_file import TensorFile, TensorMeta, StoragePool, read_span, short_repr

_ZIP_MAGIC = b"PK\x03\x04"


def _is_zipfile(path: Path) -> bool:
    """``zipfile.is_zipfile``, which itself raises BadZipFile on some damaged end records (a "multi-disk" one)."""
    try:
        return zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


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
        if mmap and not _is_zipfile(path):  # torch's own words are then e.g. "[Errno 22] Invalid argument"
            detail = "the zip archive has no end record: the file is cut short (an interrupted download?)"
        raise LoraMigrateError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {detail}") from None
    if not isinstance(obj, dict):
        raise LoraMigrateError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
    metas = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise LoraMigrateError(f"{path}: expected string keys, found {short_repr(key)}")
        if isinstance(value, dict):
            raise LoraMigrateError(f"{path}: key {short_repr(key)} holds a nested dict; expected a flat dict of tensors")
        if not isinstance(value, torch.Tensor):
            raise LoraMigrateError(f"{path}: key {short_repr(key)} holds a {type(value).__name__} value, not a tensor")
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
            raise pickle.UnpicklingError(f"unexpected persistent id {short_repr(saved_id)}")
        typename, storage_type, key, _location, numel = saved_id
        if isinstance(typename, bytes):
            typename = typename.decode("ascii")
        if typename != "storage" or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"unexpected persistent id {short_repr(saved_id)}")
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
        self._pool = StoragePool()

    def __getitem__(self, name: str) -> torch.Tensor:
        key, offset, shape, stride, dtype = self._views[name]
        storage = self._storage(key, name)
        return torch.empty(0, dtype=dtype).set_(storage, offset, shape, stride)

    def _storage(self, key: str, name: str) -> torch.UntypedStorage:
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        self._last = None  # let the previous storage go before allocating the next
        start, nbytes = self._spans[key]
        storage = read_span(self._file, self._path, name, start, nbytes, self._pool)
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



def _first_sentence(text: str) -> str:
    """torch's zip reader appends several sentences of advice to its error; keep the first."""
    return text.split(". ", 1)[0] if text.startswith("PytorchStreamReader") else text
