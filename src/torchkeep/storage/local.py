"""Atomic, durable writes on a local filesystem.

A file or directory becomes visible under its final name only after its contents are on disk:
write into a temporary sibling, fsync, rename, fsync the parent. A crash or an exception at any
point leaves either the previous object or the new one, never a truncated mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import StorageFullError

TEMP_MARKER = ".tmp-"
_MAX_PID = 2**31  # pid_t is a signed 32-bit int on Linux and macOS


def temp_sibling(final: Path) -> Path:
    """Return an unused hidden name next to ``final`` for staging its replacement."""
    return final.with_name(f".{final.name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    """True for names made by :func:`temp_sibling` (left behind only by a crash)."""
    return name.startswith(".") and TEMP_MARKER in name


def fsync_dir(path: Path) -> None:
    """Flush a directory entry table to disk (a no-op where directories cannot be opened)."""
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


def _storage_error(exc: OSError, path: Path) -> OSError:
    """Turn ENOSPC/EDQUOT into a :class:`StorageFullError` naming ``path``; keep others."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(
            exc.errno,
            f"no space left on the device while writing {path}; nothing committed earlier was "
            "touched and the partial write was removed. Free some space (or keep fewer "
            "checkpoints) and save again",
        )
    return exc


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, durable: bool = True) -> Iterator[BinaryIO]:
    """Write a file that appears at ``path`` only once it is complete.

    Yields an unbuffered binary file opened on a temporary sibling. On normal exit the file is
    fsynced (when ``durable``) and renamed over ``path``; on an exception it is deleted and
    ``path`` is left as it was.
    """
    final = Path(path)
    temp = temp_sibling(final)
    try:
        with open(temp, "xb", buffering=0) as f:
            yield f
            if durable:
                os.fsync(f.fileno())
        os.replace(temp, final)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        if isinstance(exc, OSError):
            raise _storage_error(exc, final) from exc
        raise
    if durable:
        fsync_dir(final.parent)


@contextlib.contextmanager
def staged_directory(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory that appears at ``final`` complete or not at all.

    Yields a temporary sibling directory to fill. On normal exit its contents and the directory
    itself are fsynced, it is renamed to ``final`` and the parent is fsynced. With ``overwrite``
    an existing ``final`` is moved aside first and deleted only after the new one is in place.
    On an exception the temporary directory is removed and ``final`` is untouched.
    """
    temp = temp_sibling(final)
    temp.mkdir(parents=False)
    try:
        yield temp
        for child in temp.iterdir():
            if child.is_file():
                fsync_file(child)
        fsync_dir(temp)
        _rename_into_place(temp, final, overwrite=overwrite)
    except BaseException as exc:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _storage_error(exc, final) from exc
        raise
    fsync_dir(final.parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _rename_into_place(temp: Path, final: Path, *, overwrite: bool) -> None:
    """Move ``temp`` to ``final``; with ``overwrite`` swap atomically where the OS can."""
    if not (overwrite and final.exists()):
        os.rename(temp, final)
        return
    if _exchange(temp, final):
        shutil.rmtree(temp, ignore_errors=True)  # temp now holds the old contents
        return
    retired = temp_sibling(final)  # no atomic swap: keep the gap between two renames tiny
    os.rename(final, retired)
    os.rename(temp, final)
    shutil.rmtree(retired, ignore_errors=True)


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writer_is_alive(name: str) -> bool:
    """True when the process that made temporary ``name`` still runs (it may be mid-write)."""
    pid_text = name.rsplit(TEMP_MARKER, 1)[1].split("-", 1)[0]
    # Only a process id torchkeep could have written names a writer: ASCII digits (``²`` is a
    # digit to str.isdigit but not to int) in the range of pid_t (os.kill overflows past it;
    # 0 would signal this process group).
    if not (pid_text.isascii() and pid_text.isdigit() and 0 < int(pid_text) < _MAX_PID):
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete temporary siblings left in ``directory`` by crashed writers; return what went.

    Temporaries of a process that is still running (this one included) are left alone.
    """
    removed = []
    for child in directory.iterdir():
        if is_temp_name(child.name) and not _writer_is_alive(child.name):
            if child.is_dir() and not child.is_symlink():  # a link: remove it, not its target
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    child.unlink()
            removed.append(child)
    return removed
