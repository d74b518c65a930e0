"""Moving what cannot be used out of the way, keeping it for a person to see: job folders, and
the server's own files (the job index, the cursor key) found to be no usable file."""

from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
import time
from pathlib import Path

from sd_rest.state.files import fsync_dir, make_dirs
from sd_rest.state.layout import SIDECAR, Layout

log = logging.getLogger(__name__)


class Quarantine:
    def __init__(self, layout: Layout, folders_lock: threading.Lock) -> None:
        self.layout = layout
        self._folders = folders_lock

    def move(self, folder: Path, reason: str, bad: bytes | None) -> bool:
        """Move `folder` (or a link in its place) to `<output>/.quarantine/`, with a warning.
        `bad`: the sidecar bytes found damaged; the folder is moved only if they are still
        there, so a job made anew under the same id in the meantime is never taken. Returns
        whether it was moved."""
        target = self.layout.quarantine_dir / _name(f"{folder.parent.name}-{folder.name}")
        with self._folders:
            if bad is not None:
                try:
                    if (folder / SIDECAR).read_bytes() != bad:
                        return False
                except OSError:
                    return False  # already moved, or replaced by a new job being written
            try:
                make_dirs(self.layout.quarantine_dir)
                folder.rename(target)
            except OSError as exc:
                log.warning("could not quarantine %s (%s): %s", folder / SIDECAR, reason, exc)
                return False
            fsync_dir(folder.parent)
        log.warning("moved %s to %s: %s", folder / SIDECAR, target, reason)
        return True


def set_aside(layout: Layout, path: Path, reason: str) -> bool:
    """Move `path`, a file of the server's own that is not a usable file (a folder, a link, a
    socket...), to `<output>/.quarantine/`, with a warning. Returns whether it was moved."""
    target = layout.quarantine_dir / _name(path.name.lstrip("."))
    try:
        make_dirs(layout.quarantine_dir)
        path.rename(target)
        fsync_dir(path.parent)
    except OSError as exc:
        log.warning("could not move %s (%s) out of the way: %s", path, reason, exc)
        return False
    log.warning("moved %s to %s: %s", path, target, reason)
    return True


def plain_file_or_nothing(layout: Layout, path: Path, reason: str) -> bool:
    """Whether a plain file is at `path`, a file of the server's own: anything else there (a
    folder, a link) is moved to the quarantine (`set_aside`, with `reason`), leaving nothing.
    Raises OSError when it cannot be moved, or `path` cannot be looked at."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISREG(mode):
        return True
    if not set_aside(layout, path, reason):
        raise OSError(f"{path} is not a plain file and could not be moved out of the way")
    return False


def _name(label: str) -> str:
    return f"{label}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
