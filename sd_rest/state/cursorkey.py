"""The key that signs GET /jobs cursors (listing.py): 32 random bytes in `<output>/.cursor-key`
(mode 0600, never served), made at the first start and kept, so that a client paging through
the listing across a restart is not refused. Deleting the file only makes the cursors given
out so far a 400; a copy of it lets someone else make cursors this server accepts (which then
still only name a place in the listing: nothing is read through them but a page)."""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Final

from sd_rest.state.files import fsync_dir, make_dirs
from sd_rest.state.layout import Layout
from sd_rest.state.quarantine import plain_file_or_nothing

log = logging.getLogger(__name__)

KEY_BYTES: Final = 32


def load_cursor_key(layout: Layout) -> bytes:
    """The key kept beside the index, made when there is none (or none usable). When it cannot
    be written, a key for this run only, with a warning: cursors then die with the server."""
    path = layout.cursor_key_file
    try:
        return _read(layout, path) or _create(path)
    except OSError as exc:
        log.warning(
            "cannot keep the cursor key in %s (%s): GET /jobs cursors will be refused after a "
            "restart",
            path,
            exc,
        )
        return secrets.token_bytes(KEY_BYTES)


def _read(layout: Layout, path: Path) -> bytes | None:
    if not plain_file_or_nothing(layout, path, "the cursor key is not a plain file"):
        return None
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as file:
        if stat.S_IMODE(os.fstat(file.fileno()).st_mode) & 0o077:
            os.fchmod(file.fileno(), 0o600)  # a key others can read signs for them too
        key = file.read(KEY_BYTES + 1)
    if len(key) != KEY_BYTES:
        log.warning("the cursor key %s is damaged (%d bytes): making a new one", path, len(key))
        return None
    return key


def _create(path: Path) -> bytes:
    """A new key, written whole (temp file, fsync, rename) so a crash never leaves half of one."""
    make_dirs(path.parent)
    key = secrets.token_bytes(KEY_BYTES)
    temp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.new")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return key
