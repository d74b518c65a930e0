"""The job index's connection, kept as good as the sidecars (index.py): opened, or made again
when it is damaged; reconciled with the job folders (at start, and before the next page
after damage or a failure); rebuilt from every sidecar when damage is found; given up on for
`RETRY_SECONDS` when the disk refuses. Also what a row is made of, for the writers and for
the reconciliation alike.

Runs only in the index's thread (index.py), one operation at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Iterable
from typing import Final

from sd_rest.endpoints import ENDPOINTS
from sd_rest.state.indexfile import crc, delete_index, is_damage, mark_clean, open_index
from sd_rest.state.items import IndexUnavailable, dumps, job_item
from sd_rest.state.jobs import Job
from sd_rest.state.layout import ID_RE, SIDECAR, Key, Layout

log = logging.getLogger(__name__)

# After the index could not be made: seconds before it is tried again (each try may read every
# sidecar), and the Retry-After of the 503s meanwhile.
RETRY_SECONDS: Final = 2
# (endpoint, id, created, status, item, crc): a row as the writers put it. Made whole on the
# caller's thread: the index's thread then runs only SQLite, which lets go of the GIL, and
# never holds the event loop up with Python work of its own.
NewRow = tuple[str, str, float, str, str, int]


def row_of(job: Job) -> NewRow:
    """What the index keeps of a job: its place and status, and its item as it reads now."""
    item = dumps(job_item(job))
    return (job.endpoint, job.id, job.created_at, job.status.value, item, crc(item))


class IndexReconciler:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.path = layout.index_file
        self._db: sqlite3.Connection | None = None
        self._was_clean = False  # closed in order by the last server that used it
        # Dropped after damage or a failure: read every sidecar again before the next page.
        self._stale = False
        self._retry_at = 0.0  # time.monotonic() before which the file is not tried again
        # Writes SQLite refused (the writer tries them again): the file lags the sidecars by
        # these until then, or until every sidecar is read again.
        self.unwritten: dict[Key, NewRow | None] = {}

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def connection(self) -> sqlite3.Connection:
        if self._db is None:
            if time.monotonic() < self._retry_at:
                raise IndexUnavailable("it could not be made a moment ago", RETRY_SECONDS)
            try:
                self._db, self._was_clean = self._open_or_remake()
            except (OSError, sqlite3.Error) as exc:
                raise self.unavailable(exc) from exc
        return self._db

    def _open_or_remake(self) -> tuple[sqlite3.Connection, bool]:
        try:
            return open_index(self.layout)
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                raise  # a busy, full or read-only disk: the file may be good (a 503 meanwhile)
            self._delete_damaged(exc)
            return open_index(self.layout)[0], False

    def ready(self) -> sqlite3.Connection:
        """The connection, its rows as good as the sidecars: after damage or a failure, a
        reconciliation runs first."""
        if self._stale:
            self.reconcile()
        return self.connection()

    def rollback(self) -> None:
        """Leave a transaction a failed write began, if the connection is still there."""
        with contextlib.suppress(sqlite3.Error):
            if self._db is not None and self._db.in_transaction:
                self._db.execute("ROLLBACK")

    def _drop(self) -> None:
        """Close the file as it is: not marked clean, so the next open reads every sidecar."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        self._stale = True

    def rebuild(self, damage: BaseException) -> None:
        """Damage found: the file deleted and made again from every sidecar."""
        try:
            self._delete_damaged(damage)
        except OSError as exc:
            raise self.unavailable(exc) from exc
        self.reconcile()

    def _delete_damaged(self, damage: BaseException) -> None:
        """The damaged file closed as it is and deleted: the next connection makes it again,
        and reads every sidecar into it. OSError when it cannot be cleared away."""
        log.warning("the job index %s is damaged (%s): making it again", self.path, damage)
        self._drop()
        delete_index(self.layout)

    def unavailable(self, exc: BaseException) -> IndexUnavailable:
        """The index cannot be made now: dropped, and not tried again for a while."""
        self._drop()
        self._retry_at = time.monotonic() + RETRY_SECONDS
        log.warning(
            "the job index %s cannot be made (%s): GET /jobs answers 503 until it can (tried "
            "again in %d s)",
            self.path,
            exc,
            RETRY_SECONDS,
        )
        return IndexUnavailable(str(exc), RETRY_SECONDS)

    def reconcile(self) -> int:
        """Bring the rows in line with the job folders (index.py's docstring); how many
        sidecars were read."""
        try:
            try:
                return self._reconcile_once()
            except sqlite3.DatabaseError as exc:
                if not is_damage(exc):
                    raise
                self._delete_damaged(exc)
                return self._reconcile_once()
        except (OSError, sqlite3.Error) as exc:
            raise self.unavailable(exc) from exc

    def _reconcile_once(self) -> int:
        db = self.connection()
        trusted = self._was_clean
        known: dict[Key, int] = {
            (endpoint, id_): mtime
            for endpoint, id_, mtime in db.execute("SELECT endpoint, id, mtime FROM jobs")
        }
        seen: set[Key] = set()
        db.execute("BEGIN")
        try:
            read = self._put_changed(db, known, seen, trusted)
            gone = [key for key in known if key not in seen]
            db.executemany("DELETE FROM jobs WHERE endpoint = ? AND id = ?", gone)
            db.execute("COMMIT")
        except BaseException:
            # Whatever failed (SQLite, or Python on a row): left open, the transaction would
            # make the next BEGIN an SQLite error taken for damage, and every later page
            # would read the rows half written.
            self.rollback()
            self._stale = True
            raise
        self._was_clean, self._stale = True, False  # the rows are as good as the sidecars
        if not trusted:
            # Every sidecar was read, each at least as new as a change SQLite refused before.
            self.unwritten.clear()
        if read or gone:
            log.info("job index: %d sidecar(s) read, %d row(s) removed", read, len(gone))
        return read

    def _put_changed(
        self, db: sqlite3.Connection, known: dict[Key, int], seen: set[Key], trusted: bool
    ) -> int:
        """Put the row of each sidecar that has none or changed since its row (of every one
        when the rows are not `trusted`), adding the sidecars found to `seen`; how many were
        read."""
        read = 0
        for endpoint, job_id, sidecar in self._sidecars():
            key = (endpoint, job_id)
            mtime = sidecar_mtime(sidecar)
            if mtime < 0:
                continue
            if trusted and known.get(key) == mtime:
                seen.add(key)
                continue
            read += 1
            job = _read_sidecar(sidecar, key)
            if job is None:
                continue  # the store quarantines it the first time it is read
            seen.add(key)
            endpoint_, id_, created, status, item, crc_ = row_of(job)
            db.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)",
                (endpoint_, id_, created, status, mtime, item, crc_),
            )
        return read

    def _sidecars(self) -> Iterable[tuple[str, str, str]]:
        for endpoint in ENDPOINTS:
            folder = self.layout.endpoint_dir(endpoint)
            if os.path.islink(folder):
                continue
            try:
                entries = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                if ID_RE.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                    yield endpoint, entry.name, os.path.join(entry.path, SIDECAR)

    def close(self) -> None:
        """Marked closed in order when the rows are as good as the sidecars (the next start
        then trusts them), checkpointed, closed."""
        if self._db is None:
            return  # made again and failed: nothing to mark
        with contextlib.suppress(sqlite3.Error):
            if not (self._stale or self.unwritten):
                mark_clean(self._db)
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()
        self._db = None


def sidecar_mtime(path: os.PathLike[str] | str) -> int:
    """The sidecar's mtime in ns, or -1 when there is no plain file there."""
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError:
        return -1
    return info.st_mtime_ns if stat.S_ISREG(info.st_mode) else -1


def _read_sidecar(path: str, key: Key) -> Job | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as file:
            job = Job.from_sidecar(json.loads(file.read()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    return job if (job.endpoint, job.id) == key else None
