"""Disk space: what a job may need, what is free, and telling a full disk from other faults.
Pure except `free_bytes`."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Final

_FULL: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
_SIZE = re.compile(r"(?i)\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*")
_UNITS: Final = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _FULL


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the file system holding `path` (or
    that will hold it, when it does not exist yet)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def job_bytes(images: int, width: int, height: int) -> int:
    """The most a job's images take while it runs: each PNG at most its raw RGB size (noise
    compresses poorly), twice (the script's file in the run folder, and the published copy)."""
    return images * 2 * (width * height * 3 + 64 * 1024)


def parse_size(text: str) -> int:
    """`0`, `500M`, `1.5G`, `2GiB`, `1048576`: a number of bytes (binary units)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size such as 500M, 2G or 0")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def format_size(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"
