"""Durable file operations: what is renamed into place has reached the disk first."""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """`mkdir -p` whose new entries survive a power cut: a folder made here is only durable
    once the folder holding its name has been fsynced too."""
    missing: list[Path] = []
    current = path
    while not current.is_dir():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue
        fsync_dir(folder.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename, fsync the folder: readers see the old or new file, not half."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)  # a full disk must not leave temp files behind
        raise
    fsync_dir(path.parent)


def is_temp_file(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def is_plain_file(path: Path) -> bool:
    """A regular file that is not a symbolic link: a link is never content."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def is_plain_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def read_plain(path: Path) -> bytes:
    """The bytes of a regular file, never through a link at its last component (OSError with
    ELOOP for a link, ENOENT when missing)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return file.read()


def is_link_error(exc: OSError) -> bool:
    """What O_NOFOLLOW gives for a link (Linux ELOOP; some BSDs EMLINK)."""
    return exc.errno in (errno.ELOOP, errno.EMLINK)
