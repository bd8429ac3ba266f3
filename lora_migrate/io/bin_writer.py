"""Write PyTorch ``.bin`` state dicts that ``torch.load(weights_only=True)`` reads back.

:class:`BinWriter` streams: like :class:`~lora_migrate.io.SafetensorsWriter` it takes the plan first (names,
dtypes, shapes), writes the pickle header, then accepts tensors one by one in plan order, so peak memory is one
tensor, not the whole dict. Why no public torch path serves: docs/design.md (bench/bench_bin_public.py).

``torch.save`` pickles whole storages, so a tensor that is a view (a slice of a fused matrix, a row of a
bigger buffer) would drag its entire storage into the file. Such tensors are cloned to compact contiguous
storage first; tensors that already own exactly their storage are saved as they are (no extra copy).

How the streaming writer matches ``torch.save`` (mirroring ``torch.serialization._save`` of torch 2.13):

* the zip container is torch's own ``torch._C.PyTorchFileWriter`` (64-byte aligned records, so
  ``torch.load(mmap=True)`` works; CRC32 per :func:`torch.serialization.get_crc32_options`). Like
  ``torch.save(obj, path)`` it is opened by file name when the path is ASCII (the archive folder inside the zip
  is then the file's stem, e.g. ``pytorch_adapter/``), else through a Python file object (folder ``archive/``);
* ``data.pkl`` is pickled (protocol 2) from stand-ins whose reductions are exactly the ones a real tensor of
  that dtype gives (``_rebuild_tensor_v2`` with a typed storage, or ``_rebuild_tensor_v3`` with an untyped
  storage plus the dtype for fp8/uint16/... -- asked from torch per dtype), with persistent ids
  ``('storage', <storage class>, key, 'cpu', numel)`` and keys ``"0"``, ``"1"``, ... in plan order;
* records in torch's order: ``data.pkl``, ``.format_version``, ``.storage_alignment``, ``byteorder``, then
  ``data/<key>`` per tensor, then ``version`` and ``.data/serialization_id`` (written by the zip writer itself).

For the same dict, path stem and torch, the file is byte-identical to ``torch.save(d, path)`` when each tensor
owns a compact contiguous storage (the test suite checks this). If ``PyTorchFileWriter`` is missing, or torch
reduces a planned dtype in a shape this module does not know, :class:`BinWriter` falls back to collecting the
tensors and calling ``torch.save`` on close (correct output, but memory grows with the file);
``BinWriter.streaming`` tells which mode is in use.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import stat
import sys
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch

from lora_migrate.errors import LoraMigrateError
from lora_migrate.io._common import (OutOfSpace, PlannedWriter, WriteBehind, fault_point, is_out_of_space,
                                     oneline, write_errors)


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


# --------------------------------------------------------------------------------------------------------------
# Streaming writer
# --------------------------------------------------------------------------------------------------------------

_PROBE_BYTES = 1 << 20  # appended to a file whose C++ write failed, to learn the OS error (see _probe)


def _file_writer_class():
    """``torch._C.PyTorchFileWriter`` if this torch has the methods the streaming writer uses, else None."""
    cls = getattr(torch._C, "PyTorchFileWriter", None)
    if cls is None or not all(hasattr(cls, m) for m in ("write_record", "write_end_of_file")):
        return None
    return cls


def _crc32_option() -> bool:
    getter = getattr(torch.serialization, "get_crc32_options", None)
    return True if getter is None else bool(getter())


def _storage_alignment() -> int:
    getter = getattr(torch.serialization, "_get_storage_alignment", None)
    return 64 if getter is None else int(getter())


def _pickle_protocol() -> int:
    return getattr(torch.serialization, "DEFAULT_PROTOCOL", 2)


_REDUCTIONS: dict[torch.dtype, tuple | None] = {}


def _reduction(dtype: torch.dtype):
    """How ``torch.save`` pickles a plain tensor of ``dtype``: ``(rebuild_func, storage_class, typed, tail)``.

    Asked from torch itself by reducing an empty tensor, so the choice between ``_rebuild_tensor_v2`` (typed
    storage such as ``torch.FloatStorage``, numel counted in elements) and ``_rebuild_tensor_v3`` (untyped
    storage, numel counted in bytes, dtype appended) follows the installed torch. ``None`` if the reduction
    is not one this module knows how to mirror (the writer then falls back to ``torch.save``).
    Raises ValueError for dtypes torch cannot save at all (quantized ones).
    """
    if dtype in _REDUCTIONS:
        return _REDUCTIONS[dtype]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "ComplexHalf support is experimental"
            func, args = torch.empty(0, dtype=dtype).__reduce_ex__(2)
    except Exception as exc:
        raise ValueError(f"torch cannot save tensors of dtype {dtype}: {oneline(exc)}") from None
    result = None
    utils = torch._utils
    known = {getattr(utils, n, None) for n in ("_rebuild_tensor_v2", "_rebuild_tensor_v3")} - {None}
    if (
        func in known
        and isinstance(args, tuple)
        and len(args) >= 6
        and args[1] == 0
        and args[4] is False
        and isinstance(args[5], OrderedDict)
        and not args[5]
        and all(isinstance(x, torch.dtype) for x in args[6:])  # v3 appends the dtype; no metadata dict
    ):
        storage = args[0]
        if isinstance(storage, torch.storage.TypedStorage):
            try:
                storage_class = getattr(torch, storage._pickle_storage_type())
            except (AttributeError, KeyError):
                storage_class = None
            typed = True
        elif isinstance(storage, torch.UntypedStorage):
            storage_class = getattr(torch, type(storage).__name__, None)  # serialization.normalize_storage_type
            typed = False
        else:
            storage_class = None
        if storage_class is not None:
            result = (func, storage_class, typed, tuple(args[6:]))
    _REDUCTIONS[dtype] = result
    return result


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Strides torch gives a fresh contiguous tensor of ``shape`` (sizes 0 and 1 count as 1)."""
    strides = []
    acc = 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


class _StorageStub:
    """Stands for one tensor's storage in data.pkl; pickled as a persistent id."""

    __slots__ = ("pid",)

    def __init__(self, storage_class, key: str, numel: int):
        self.pid = (storage_class, key, numel)


class _TensorStub:
    """Stands for one tensor in data.pkl: reduces exactly as torch's ``Tensor._reduce_ex_internal`` does."""

    __slots__ = ("_reduce",)

    def __init__(self, func, args: tuple):
        self._reduce = (func, args)

    def __reduce_ex__(self, protocol):
        return self._reduce


class _StubPickler(pickle.Pickler):
    """``torch.serialization._save``'s ``PyTorchPickler``, for stand-in storages."""

    def persistent_id(self, obj):
        if type(obj) is _StorageStub:
            storage_class, key, numel = obj.pid
            # fresh tuple each call and interned "storage"/"cpu", as torch's persistent_id + location_tag
            return ("storage", storage_class, key, "cpu", numel)
        return None


class BinWriter(PlannedWriter):
    """Write a ``torch.save``-format ``.bin`` in two phases: ``add`` every tensor, ``write_header``, ``write``
    each in order, ``close``. The result loads with ``torch.load(path, weights_only=True)`` (and ``mmap=True``)
    as a plain ``dict[str, Tensor]`` whose key order is the plan order.

    As a context manager, an exception (or an incomplete file at exit) closes and deletes the partial file.
    ENOSPC raises :class:`~lora_migrate.io.OutOfSpace`; other write failures a one-line LoraMigrateError.
    """

    def __init__(self, path: str | os.PathLike):
        self._fspath = os.fspath(path)  # passed to torch's writer as torch.save(obj, path) passes it
        if not isinstance(self._fspath, str):
            raise ValueError("BinWriter needs a str path")
        super().__init__()
        self.path = Path(path)
        self._zip = None  # torch._C.PyTorchFileWriter
        self._stream = None  # Python file object under the zip writer (non-ASCII paths), else None
        self._buffer: dict[str, torch.Tensor] | None = None  # fallback mode: tensors for torch.save at close
        self._behind: tuple[int, WriteBehind] | None = None  # (own read-only fd, its write-behind) when streaming
        self._started = False
        self._done = False
        self.streaming: bool | None = None  # decided by write_header()

    # -- phase 1 ---------------------------------------------------------------------------------------------
    def _check_dtype(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        _reduction(dtype)  # ValueError for dtypes torch cannot save

    def _pickle_bytes(self) -> bytes:
        """data.pkl for the plan, as ``torch.serialization._save`` pickles the equivalent dict."""
        obj = {}
        for i, (name, (dtype, shape, nbytes)) in enumerate(self._plan.items()):
            key = str(i)  # storages are numbered in plan order, as torch.save numbers them
            func, storage_class, typed, tail = _reduction(dtype)
            numel = nbytes // dtype.itemsize if typed else nbytes
            size = tuple(list(shape))  # a fresh tuple per tensor, as tuple(t.size()): pickle memoizes by id
            args = (_StorageStub(storage_class, key, numel), 0, size, _contiguous_strides(shape), False,
                    OrderedDict(), *tail)
            obj[name] = _TensorStub(func, args)
        buf = io.BytesIO()
        _StubPickler(buf, protocol=_pickle_protocol()).dump(obj)
        return buf.getvalue()

    def write_header(self) -> None:
        """Create the file and write data.pkl and the metadata records; the plan is frozen from here on."""
        if self._started or self._done:
            raise ValueError("write_header() called twice")
        self._started = True
        writer_class = _file_writer_class()
        self.streaming = writer_class is not None and all(_reduction(d) is not None for d, *_ in self._plan.values())
        if not self.streaming:
            self._buffer = {}
            with write_errors(self.path):  # fail early (missing directory, permissions) and own the file
                open(self.path, "wb").close()
            return
        data = self._pickle_bytes()
        alignment = _storage_alignment()
        with self._zip_errors():
            try:
                self._fspath.encode("ascii")
            except UnicodeEncodeError:  # PyTorchFileWriter opens ASCII names only; torch.save does the same
                self._stream = open(self._fspath, "wb")  # noqa: SIM115 -- closed in close()/abort()
                self._zip = writer_class(self._stream, _crc32_option(), alignment)
            else:
                self._zip = writer_class(self._fspath, _crc32_option(), alignment)
            self._zip.write_record("data.pkl", data, len(data))
            self._zip.write_record(".format_version", "1", len("1"))
            self._zip.write_record(".storage_alignment", str(alignment), len(str(alignment)))
            self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        if self.path.is_file():  # torch's writer keeps its file to itself: start write-back through our own fd
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except OSError:
                return
            self._behind = (fd, WriteBehind(fd))

    # -- phase 2 ---------------------------------------------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor; its name, dtype and shape must match the plan exactly.

        The writer keeps no reference to ``tensor`` (in streaming mode): its bytes go to the file now.
        """
        i = self._take_next(name, tensor)
        _, _, nbytes = self._plan[name]
        key = str(i)
        t = _compact(tensor)
        storage = t.untyped_storage()
        if storage.nbytes() != nbytes:  # cannot happen for a compact tensor; guards the layout invariant
            raise ValueError(f"tensor {name!r}: {storage.nbytes()} bytes, planned {nbytes}")
        if self._buffer is not None:
            self._buffer[name] = t
        else:
            with self._zip_errors():
                fault_point("write")
                self._zip.write_record(f"data/{key}", storage, nbytes)
            if self._behind is not None:
                self._behind[1].wrote(os.fstat(self._behind[0]).st_size)
        self._next += 1

    def close(self) -> None:
        """Finish the zip, fsync and close. Raises ValueError (and deletes the file) if the plan is unfinished."""
        if self._done:
            return
        self._check_complete()
        if self._buffer is not None:
            self._close_fallback()
            return
        self._close_behind()
        with self._zip_errors():
            self._zip.write_end_of_file()  # also closes the C++ file stream when opened by name
            if self._stream is not None:
                self._stream.flush()
                os.fsync(self._stream.fileno())
                self._stream.close()
            else:
                _fsync_path(self.path)
        self._zip = self._stream = None
        self._done = True

    def _close_fallback(self) -> None:
        buffered, self._buffer = self._buffer, None
        try:
            with self._zip_errors():
                torch.save(buffered, self._fspath)
                _fsync_path(self.path)
        finally:
            del buffered
        self._done = True

    def abort(self) -> None:
        """Close without finishing and delete the partial file."""
        if self._done:
            return
        self._done = True
        self._buffer = None
        self._close_behind()
        zip_writer, stream, self._zip, self._stream = self._zip, self._stream, None, None
        if zip_writer is not None:
            # Finalize explicitly: PyTorchFileWriter's destructor finalizes an unfinished archive itself and,
            # if that throws (as it does after a failed write), the process dies in std::terminate.
            try:
                zip_writer.write_end_of_file()
            except Exception:
                pass
            del zip_writer
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
        if self._started and self.path.is_file():  # never unlink a device node such as /dev/full
            self.path.unlink(missing_ok=True)

    def _close_behind(self) -> None:
        behind, self._behind = self._behind, None
        if behind is not None:
            os.close(behind[0])

    def __del__(self):
        # An abandoned writer must not reach PyTorchFileWriter's destructor unfinished (see abort()).
        if getattr(self, "_zip", None) is not None:
            try:
                self.abort()
            except Exception:
                pass

    # -- errors ----------------------------------------------------------------------------------------------
    @contextmanager
    def _zip_errors(self):
        """Map zip-writer failures to one-line errors, deleting the partial file.

        Through a Python file object, failures arrive as the OS's own OSError. Opened by name, torch's C++
        writer only says ``RuntimeError('basic_ios::clear: iostream error')`` or similar; the OS error is
        then recovered by :meth:`_probe` (so a full disk is still :class:`OutOfSpace`).
        """
        try:
            yield
        except OSError as exc:
            self.abort()
            with write_errors(self.path):
                raise exc
        except RuntimeError as exc:
            cause = None if is_out_of_space(exc) else self._probe()
            self.abort()
            if is_out_of_space(exc):
                raise OutOfSpace(f"no space left on device while writing {self.path}") from exc
            if cause is not None:
                with write_errors(self.path):
                    raise cause from exc
            raise LoraMigrateError(f"{self.path}: cannot write: {oneline(exc)}") from exc
        except BaseException:
            self.abort()
            raise

    def _probe(self) -> OSError | None:
        """The OS error a write to ``path`` gets now, or None if writing works (the failure was not the OS's)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            try:  # reproduce the open: missing directory, no permission, ...
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except OSError as exc:
                return exc
            os.close(fd)
            os.unlink(self.path)
            return None
        except OSError as exc:
            return exc
        if stat.S_ISDIR(st.st_mode):
            return IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(self.path))
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            return None
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:  # a partial file we are about to delete: more than any block's slack, then to the disk
                os.write(fd, bytes(_PROBE_BYTES))
                if stat.S_ISREG(st.st_mode):
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            return exc
        return None


def _fsync_path(path: Path) -> None:
    """fsync a file another writer (torch's C++ stream) wrote and closed; skips device nodes."""
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
