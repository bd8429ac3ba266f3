"""Shared pieces of the io package: the safetensors dtype table and error helpers.

``DTYPES`` maps each safetensors dtype code to its torch dtype, its width in bits as the format counts it, and
its rank in the on-disk order that ``safetensors.torch.save_file`` uses (the declaration order of the Rust
``Dtype`` enum; save_file lays tensors out by *descending* rank, then by name).
"""

from __future__ import annotations

import errno
import re
from contextlib import contextmanager
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lora_migrate.errors import LoraMigrateError

#: The biggest header the safetensors reader accepts (Rust ``MAX_HEADER_SIZE``).
MAX_HEADER_SIZE = 100_000_000


@dataclass(frozen=True)
class DtypeInfo:
    code: str
    torch_dtype: torch.dtype
    bits: int  # bits per element *as the header counts elements* (F4: 4 bits, two per torch element)
    rank: int  # position in safetensors' Rust ``Dtype`` enum


# Rust enum order: BOOL F4 F6_E2M3 F6_E3M2 U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 F8_E4M3FNUZ F8_E5M2FNUZ I16 U16 F16 BF16
# I32 U32 F32 C64 F64 I64 U64. F6_* have no torch dtype and are absent here (rejected as unsupported).
_TABLE = [
    ("BOOL", "bool", 8, 0), ("F4", "float4_e2m1fn_x2", 4, 1), ("U8", "uint8", 8, 4), ("I8", "int8", 8, 5),
    ("F8_E5M2", "float8_e5m2", 8, 6), ("F8_E4M3", "float8_e4m3fn", 8, 7), ("F8_E8M0", "float8_e8m0fnu", 8, 8),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz", 8, 9), ("F8_E5M2FNUZ", "float8_e5m2fnuz", 8, 10), ("I16", "int16", 16, 11),
    ("U16", "uint16", 16, 12), ("F16", "float16", 16, 13), ("BF16", "bfloat16", 16, 14), ("I32", "int32", 32, 15),
    ("U32", "uint32", 32, 16), ("F32", "float32", 32, 17), ("C64", "complex64", 64, 18), ("F64", "float64", 64, 19),
    ("I64", "int64", 64, 20), ("U64", "uint64", 64, 21),
]
DTYPES: dict[str, DtypeInfo] = {
    code: DtypeInfo(code, getattr(torch, name), bits, rank)
    for code, name, bits, rank in _TABLE
    if hasattr(torch, name)
}
BY_TORCH: dict[torch.dtype, DtypeInfo] = {info.torch_dtype: info for info in DTYPES.values()}


class OutOfSpace(LoraMigrateError):
    """The disk filled up while writing an output (ENOSPC / EDQUOT)."""


def oneline(exc: BaseException) -> str:
    """First non-empty line of an exception's message (torch and safetensors messages span lines)."""
    for line in str(exc).splitlines():
        if line.strip():
            return re.sub(r"\s+", " ", line.strip())
    return type(exc).__name__


def is_out_of_space(exc: BaseException | None) -> bool:
    """True if ``exc`` or anything in its cause/context chain is an ENOSPC or EDQUOT OSError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OutOfSpace) or (
            isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def write_errors(path):
    """Turn an OSError while writing ``path`` into a one-line LoraMigrateError (:class:`OutOfSpace` if disk full)."""
    try:
        yield
    except OSError as exc:
        if is_out_of_space(exc):
            raise OutOfSpace(f"no space left on device while writing {path}") from exc
        raise LoraMigrateError(f"{path}: cannot write: {exc.strerror or oneline(exc)}") from exc


class ClosesOrAborts:
    """As a context manager: ``close()`` on success, ``abort()`` (which deletes the partial file) on an error."""

    def abort(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


class PlannedWriter(ClosesOrAborts):
    """The plan shared by the two-phase writers: ``add`` every tensor (name, dtype, shape), ``write_header``,
    then ``write`` each tensor in plan order, ``close``. This class keeps the plan and checks every call against
    it (ValueError on a mismatch); subclasses lay out the bytes. As a context manager, an exception (or an
    incomplete plan at exit) aborts and deletes the partial file.
    """

    def __init__(self) -> None:
        self._plan: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}  # dtype, shape, nbytes
        self._order: list[str] = []
        self._next = 0

    def _check_dtype(self, name: str, dtype: torch.dtype) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def add(self, name: str, dtype: torch.dtype, shape: Sequence[int]) -> None:
        """Plan one tensor (torch dtype and shape). Duplicate names and bad values raise ValueError."""
        if self._started or self._done:
            raise ValueError("add() after write_header()")
        if not isinstance(name, str):
            raise ValueError(f"invalid tensor name {name!r}")
        if name in self._plan:
            raise ValueError(f"duplicate tensor name {name!r}")
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"tensor {name!r}: {dtype!r} is not a torch.dtype")
        shape = tuple(shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r}: invalid shape {shape!r}")
        self._check_dtype(name, dtype, shape)
        numel = 1
        for d in shape:
            numel *= d
        self._plan[name] = (dtype, shape, numel * dtype.itemsize)
        self._order.append(name)

    def _take_next(self, name: str, tensor: torch.Tensor) -> int:
        """Check that ``tensor`` is the next planned one; return its index in the plan."""
        if not self._started or self._done:
            raise ValueError("write() before write_header()" if not self._started else "write() after close()")
        if self._next >= len(self._order):
            raise ValueError(f"write({name!r}): all planned tensors were already written")
        expected = self._order[self._next]
        dtype, shape, _ = self._plan[expected]
        if name != expected:
            raise ValueError(f"write({name!r}): the plan expects {expected!r} next")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise ValueError(f"tensor {name!r}: expected a dense torch.Tensor")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r}: got {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}")
        return self._next

    def _check_complete(self) -> None:
        """Before closing: abort and raise ValueError if the header or any planned tensor was not written."""
        if not self._started or self._next < len(self._order):
            missing = self._order[self._next] if self._started else "the header"
            n = len(self._order) - self._next
            self.abort()
            raise ValueError(f"{self.path}: closed before writing {missing} ({n} planned tensors unwritten)")


_LIBC: list = []


def libc():
    """The C library through ctypes (errno kept), or None where there is none to load; loaded on first use."""
    if not _LIBC:
        import ctypes

        try:
            _LIBC.append(ctypes.CDLL("libc.so.6", use_errno=True))
        except OSError:
            import ctypes.util  # runs ldconfig: only where libc.so.6 is not the name

            try:
                _LIBC.append(ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True))
            except OSError:
                _LIBC.append(None)
    return _LIBC[0]


_FUNCTIONS: dict = {}


def libc_function(name: str, argtypes: list, restype):
    """A libc function with its signature set, or None if this C library lacks it."""
    if name not in _FUNCTIONS:
        fn = getattr(libc(), name, None)
        if fn is not None:
            fn.argtypes, fn.restype = argtypes, restype
        _FUNCTIONS[name] = fn
    return _FUNCTIONS[name]


_SINCE_TRIM = [0]
TRIM_EVERY = 64 << 20


class WriteBehind:
    """Start the disk writes of a file as it grows (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` every
    ``EVERY`` bytes), so the fsync that makes it durable before the rename only waits for the last piece.

    Measured writing 1.1 GB here: write + fsync 0.59 s → 0.50 s (median of 6); the kernel writes back while the
    next tensors are computed instead of all at the end. Every 4 MB rather than 16 or 64 MB: convert() of the
    1.1 GB adapter 1.24 / 1.41 / 1.42 s (.bin), 1.09 / 1.21 / 1.30 s (safetensors), medians of 9. It changes
    nothing a reader sees and is no substitute for the fsync. A no-op where the call is missing or refused (other
    systems, pipes, /dev/full).
    """

    EVERY = 4 << 20

    def __init__(self, fd: int):
        import ctypes

        self._fd = fd
        self._done = 0
        self._call = libc_function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint],
                                   ctypes.c_int)

    def wrote(self, end: int, flush=None) -> None:
        """The file now holds ``end`` bytes; ``flush()`` hands buffered ones to the OS (called only when due)."""
        if self._call is not None and end - self._done >= self.EVERY:
            if flush is not None:
                flush()
            if self._call(self._fd, self._done, end - self._done, 2) != 0:  # 2: SYNC_FILE_RANGE_WRITE
                self._call = None  # unsupported here: stop trying; the fsync at the end does it all
            self._done = end


def release_memory(nbytes: int | None = None) -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), between modules.

    Module-sized tensors (MBs) are freed after each module; glibc's dynamic mmap threshold then serves later
    ones from the heap, whose fragments it keeps, so resident memory would creep up with the file's size.
    With ``nbytes`` (the bytes just processed) the trim happens only once ``TRIM_EVERY`` (64 MB) have passed:
    every trim makes the next allocations fault their pages in afresh, which cost 40 % of a conversion's CPU time
    when trimming after every module (measured, 224 MB bf16), while resident memory stays within ~64 MB of flat.
    """
    if nbytes is not None:
        _SINCE_TRIM[0] += nbytes
        if _SINCE_TRIM[0] < TRIM_EVERY:
            return
    _SINCE_TRIM[0] = 0
    import ctypes

    trim = libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)  # glibc only
    if trim is not None:
        trim(0)


@contextmanager
def few_threads():
    """Run torch with one intra-op thread (``LORA_MIGRATE_THREADS`` overrides), restoring the setting after.

    A conversion is a stream of memory-bound elementwise passes over module-sized tensors. torch's OpenMP pool
    spin-waits between them; on a 2-core machine shared with anything else that made a 224 MB bf16 conversion
    10× slower with 2 threads than with 1 (28.8 s vs 2.7 s, measured). One thread loses little when idle.
    """
    import os

    try:
        want = int(os.environ.get("LORA_MIGRATE_THREADS", "1"))
    except ValueError:
        want = 1
    before = torch.get_num_threads()
    if want < 1 or want == before:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_FAULT_COUNTS: dict[str, int] = {}


class InjectedBug(Exception):
    """What ``LORA_MIGRATE_FAULT=bug:POINT:N`` raises: an error no handler expects."""


def fault_point(name: str) -> None:
    """A named point in the writers where tests inject failures (never set in normal use).

    ``LORA_MIGRATE_FAULT=ACTION:POINT:N`` acts at the N-th time POINT is reached in this process:
    ``enospc`` raises ENOSPC as a full disk does; ``pause`` creates the file named by
    ``LORA_MIGRATE_FAULT_MARKER`` and sleeps, so that a test can kill -9 the process at exactly that point;
    ``bug`` raises :class:`InjectedBug`, as a bug would (the CLI's exit 3).
    """
    import os

    spec = os.environ.get("LORA_MIGRATE_FAULT")
    if not spec:
        return
    try:
        action, point, n = spec.split(":")
        n = int(n)
    except ValueError:
        return
    if point != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] != n:
        return
    _FAULT_COUNTS.pop(name)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if action == "bug":
        raise InjectedBug(f"fault injected at {name!r}")
    if action == "pause":
        import time

        marker = os.environ.get("LORA_MIGRATE_FAULT_MARKER")
        if marker:
            open(marker, "w").close()
        time.sleep(600)
