"""Looking up a path the caller gave, with typed errors for paths no file can have.

``Path.exists()`` and its siblings return False for a missing file but raise a raw ``OSError``
for a name longer than the file system allows (``ENAMETOOLONG``), a folder on the way that may
not be searched (``EACCES``) or an I/O error. Every public function that takes a path looks it
up here once, so those become torchkeep's typed errors naming the path.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import TorchkeepFileNotFoundError, UnreadableFileError

# What Path.exists() reports as "nothing there": missing, a file used as a folder, a dangling
# symlink or a loop of them.
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EBADF)


def lookup(path: Path) -> os.stat_result | None:
    """The status of ``path`` (symlinks followed), or None when nothing is there.

    Raises:
        TorchkeepFileNotFoundError: no file can have this path (a NUL character, a name longer
            than the file system allows).
        UnreadableFileError: the file system refuses the lookup (a folder on the way may not
            be searched, an I/O error).
    """
    try:
        return os.stat(path)
    except ValueError:  # an embedded NUL
        raise TorchkeepFileNotFoundError(
            f"{str(path)!r} holds a NUL character, which no file name can contain; check the path"
        ) from None
    except OSError as exc:
        if exc.errno in _ABSENT:
            return None
        if exc.errno == errno.ENAMETOOLONG:
            raise TorchkeepFileNotFoundError(
                f"{path} cannot name a file: a name in it is longer than the file system allows "
                f"({exc.strerror}); check the path"
            ) from None
        raise UnreadableFileError(
            f"{path} cannot be looked up ({exc.strerror or exc}); check the permissions of the "
            "folders on its way"
        ) from None


def require_exists(path: Path) -> os.stat_result:
    """The status of ``path``; a typed error when nothing is there (see :func:`lookup`).

    Raises:
        TorchkeepFileNotFoundError: nothing is there, or no file can have this path.
        UnreadableFileError: the file system refuses the lookup.
    """
    info = lookup(path)
    if info is None:
        raise TorchkeepFileNotFoundError(f"{path} does not exist; check the path")
    return info


def write_target(path: Path) -> os.stat_result | None:
    """Check that ``path`` can be written (its folder exists, its name can exist) and return
    what is there now (None: nothing).

    Raises:
        TorchkeepFileNotFoundError: the folder is missing, or no file can have this path.
        UnreadableFileError: the file system refuses the lookup.
    """
    folder = lookup(path.parent)
    if folder is None or not stat.S_ISDIR(folder.st_mode):
        raise TorchkeepFileNotFoundError(f"cannot write {path}: folder {path.parent} is missing")
    return lookup(path)
