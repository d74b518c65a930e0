"""Moving job folders that cannot be used out of the way, keeping them for a person to see."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from pathlib import Path

from .files import fsync_dir, make_dirs
from .layout import SIDECAR, Layout

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
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{folder.parent.name}-{folder.name}-{stamp}-{secrets.token_hex(3)}"
        target = self.layout.quarantine_dir / name
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
