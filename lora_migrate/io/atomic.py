"""All-or-nothing output directories, and the check that input and output do not overlap.

:func:`atomic_output` hands out a temporary directory next to the destination (same filesystem, so the final
step is a rename), fsyncs what was written there and renames it into place. Replacing an existing output uses
Linux ``renameat2(RENAME_EXCHANGE)`` where available, which swaps old and new in one step so ``out`` is always
the complete old or the complete new output; elsewhere the old output is first renamed aside, which leaves a
moment in which ``out`` does not exist (but never a partial one). A failure leaves ``out`` untouched.

A process killed with SIGKILL cannot delete its temporary directory. Each name therefore carries its owner:
``.<out>.lora-migrate-tmp-<host>-<pid>-<random>`` (host: 8 hex digits of the host name), and the next
:func:`atomic_output` for the same ``out`` removes those whose owner is gone (:func:`remove_stale`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_migrate.errors import LoraMigrateError
from lora_migrate.io._common import OutOfSpace, fault_point, is_out_of_space, libc, oneline

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@contextmanager
def atomic_output(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp directory next to ``out``; on success it becomes ``out``, on error it is deleted.

    Refuses (LoraMigrateError) if ``out`` exists and not ``overwrite``; creates ``out``'s parent if needed.
    A full disk inside the block becomes OutOfSpace("no space left on device while writing <out>"), a
    LoraMigrateError.
    """
    with _atomic(Path(out), overwrite, file=False) as tmp:
        yield tmp


@contextmanager
def atomic_file(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """:func:`atomic_output` for a one-file output: yields the path to write, ``<temp dir>/<out name>``; on
    success that file becomes ``out`` (the same rename, exchange or move-aside), and the temp dir is deleted."""
    out = Path(out)
    with _atomic(out, overwrite, file=True) as tmp:
        yield tmp / out.name


@contextmanager
def _atomic(out: Path, overwrite: bool, file: bool) -> Iterator[Path]:
    if os.path.lexists(out) and not overwrite:
        raise LoraMigrateError(f"{out} already exists; pass --overwrite to replace it")
    parent = out.parent
    remove_stale(out)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(out, "tmp"), dir=parent))
    except OSError as exc:
        reason = exc.strerror or oneline(exc)
        raise LoraMigrateError(f"cannot create output directory in {parent}: {reason}") from None
    finishing = False
    try:
        yield tmp
        finishing = True
        _fsync_tree(tmp)
        if file:
            _install(tmp / out.name, out, overwrite)
            _remove(tmp)
        else:
            _install(tmp, out, overwrite)
    except BaseException as exc:
        _remove(tmp)
        if is_out_of_space(exc):
            raise OutOfSpace(f"no space left on device while writing {out}") from exc
        if finishing and isinstance(exc, OSError):  # fsync / rename; the caller's own OSErrors pass through
            raise LoraMigrateError(f"cannot write {out}: {exc.strerror or oneline(exc)}") from exc
        raise


def _host_tag() -> str:
    import socket
    import zlib

    return f"{zlib.crc32(socket.gethostname().encode('utf-8', 'surrogateescape')):08x}"


def _prefix(out: Path, kind: str) -> str:
    """``.<out>.lora-migrate-<kind>-<host>-<pid>-``; mkdtemp appends 8 random characters."""
    return f".{out.name}.lora-migrate-{kind}-{_host_tag()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return True  # cannot tell: keep its folder
    return True


def remove_stale(out: str | os.PathLike) -> list[Path]:
    """Delete the temporary directories that earlier runs for ``out`` left behind when they were killed, and
    return them. Only what is clearly ours: a directory (not a link) of this user named exactly
    ``.<out name>.lora-migrate-tmp-<host>-<pid>-<8 chars>`` by a process of this host that no longer runs. A
    ``-old-`` folder (the previous output moved aside while replacing it, see :func:`_install`) is deleted on the
    same terms and only while ``out`` exists, since otherwise it may hold the only copy of the previous output.
    Names without a pid (older versions) and folders of live processes are left alone."""
    out = Path(out)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.lora-migrate-(tmp|old)-([0-9a-f]{{8}})-([0-9]+)-[a-z0-9_]{{8}}")
    try:
        names = os.listdir(out.parent)
    except OSError:
        return []
    host, removed = _host_tag(), []
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or m.group(2) != host or _alive(int(m.group(3))):
            continue
        if m.group(1) == "old" and not os.path.lexists(out):
            continue
        p = out.parent / name
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == getattr(os, "getuid", lambda: st.st_uid)():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def refuse_overlap(src: str | os.PathLike, out: str | os.PathLike) -> None:
    """Raise LoraMigrateError if ``out`` is ``src``, lies inside it, or contains it (symlinks resolved)."""
    s, o = Path(src).resolve(), Path(out).resolve()
    if o == s:
        raise LoraMigrateError(f"output {out} is the input {src}; choose another output path")
    if o.is_relative_to(s):
        raise LoraMigrateError(f"output {out} is inside the input {src}; choose a path outside it")
    if s.is_relative_to(o):
        raise LoraMigrateError(f"input {src} is inside the output {out}; replacing the output would delete it")


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``out`` (replacing an old ``out`` only if ``overwrite``)."""
    fault_point("install")
    if not os.path.lexists(out):
        # rename() would silently replace an empty directory created meanwhile; treat that as a clash too
        os.rename(tmp, out)
    elif not overwrite:
        raise LoraMigrateError(f"{out} already exists; pass --overwrite to replace it")
    elif _exchange(tmp, out):
        _remove(tmp)  # tmp now holds the old output
    else:
        aside = Path(tempfile.mkdtemp(prefix=_prefix(out, "old"), dir=out.parent))
        old = aside / "old"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            _remove(aside)
            raise
        _remove(aside)
    _fsync_dir(out.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False if the OS/filesystem cannot."""
    renameat2 = getattr(libc(), "renameat2", None)
    if renameat2 is None:
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and directory under ``root`` (so the rename publishes durable data)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(dirpath)


def _fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
