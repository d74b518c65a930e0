"""The job index: every job on disk, in an SQLite file under the output folder
(`<output>/.index.sqlite3`, never served), so that GET /jobs reads one page of rows instead of
scanning job folders.

Who keeps it right:
- the store's writers: every change a client can see (store.py `add`, `_make_visible`) puts
  the job's row; a job forgotten or quarantined has its row removed;
- recovery, at each start (`reconcile`): the job folders are listed and every sidecar's mtime
  compared with the row's; a folder with no row, or a sidecar changed since, is read again, and
  rows without a folder go. After a stop that did not close the index (a crash, `kill -9`, a
  power cut) every sidecar is read again: a row could then be older than its sidecar with
  the same mtime.

Everything runs in the index's own thread, one operation at a time and in the order asked
(changes are written in batches, up to `WRITE_DELAY` after they are put): a page asked for
after a change sees it, a page asked for during the start's reconciliation
waits for it, and a reconciliation can never write a row older than a change put after it.
The file is derived data: damage found at any time (it cannot be opened, fails the start's
check, an SQLite error says so, an item fails its CRC: indexfile.py) has it made again from the
sidecars in this thread, and the page that found it is then read from the new file. When it
cannot be made (the disk refuses), pages are `IndexUnavailable` (a 503 with Retry-After) and
it is tried again `RETRY_SECONDS` later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final, TypeVar

from sd_rest.endpoints import ENDPOINTS
from sd_rest.state.indexfile import (
    Damaged,
    crc,
    delete_index,
    is_damage,
    mark_clean,
    open_index,
    read_page,
)
from sd_rest.state.items import IndexClosed, IndexUnavailable, Place, Row, dumps, job_item
from sd_rest.state.jobs import Job, Status
from sd_rest.state.layout import ID_RE, SIDECAR, Key, Layout

log = logging.getLogger(__name__)

T = TypeVar("T")

WRITE_DELAY: Final = 0.05  # seconds a change may wait to be written with the ones after it
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


class JobIndex:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.path = layout.index_file
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="job-index")
        self._db: sqlite3.Connection | None = None
        self._was_clean = False  # closed in order by the last server that used it
        # Dropped after damage or a failure: read every sidecar again before the next page.
        self._stale = False
        self._retry_at = 0.0  # time.monotonic() before which the file is not tried again
        self._unwritten: dict[Key, NewRow | None] = {}  # writes SQLite refused, retried
        self._closed = False
        self.reconciling: Future[int] | None = None
        # Changes wait here to be written together (see `_flush_later`).
        self._queued: dict[Key, NewRow | None] = {}
        self._flush_pending = False  # a `_flush_later` is in the thread's queue
        self._readers = 0  # pages asked for and not yet read: they want the changes now
        self._queue_changed = threading.Condition()

    # --- what the store and recovery call (any thread; never blocks) -------------------

    def put(self, job: Job) -> None:
        self._queue((job.endpoint, job.id), row_of(job))

    def remove(self, endpoint: str, job_id: str) -> None:
        self._queue((endpoint, job_id), None)

    def _queue(self, key: Key, row: NewRow | None) -> None:
        with self._queue_changed:
            self._queued[key] = row
            if self._flush_pending or self._closed:
                return  # the close writes what is queued
            self._flush_pending = True
        self._submit(self._flush_later)

    def reconcile(self) -> Future[int]:
        """Bring the index in line with the job folders (see the module's docstring); the
        future gives how many sidecars were read."""
        self.reconciling = self._submit(self._reconcile)
        return self.reconciling

    async def page(
        self, statuses: Iterable[Status], endpoints: Iterable[str], after: Place | None, limit: int
    ) -> list[Row]:
        """Up to `limit` rows with one of `statuses` and `endpoints`, newest first, from just
        after `after`."""
        values = sorted(status.value for status in statuses)
        with self._queue_changed:
            self._readers += 1  # a flush waiting ahead of this page goes at once
            self._queue_changed.notify_all()
        try:
            future = self._submit(self._page, values, sorted(endpoints), after, limit)
        except BaseException:
            self._read_done()
            raise
        future.add_done_callback(lambda _: self._read_done())
        return await asyncio.wrap_future(future)

    def _read_done(self) -> None:
        with self._queue_changed:
            self._readers -= 1

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Write what is left, mark the file as closed in order, stop the thread (blocking)."""
        if self._closed:
            return
        with self._queue_changed:
            self._closed = True
            self._queue_changed.notify_all()
        with contextlib.suppress(RuntimeError):
            self._thread.submit(self._close).result()
        self._thread.shutdown(wait=True)

    def _submit(self, function: Callable[..., T], *args: Any) -> Future[T]:
        if self._closed:
            # A change after the store closed (a request the server is still finishing): its
            # sidecar's new mtime makes the next start read it again.
            future: Future[T] = Future()
            future.set_exception(IndexClosed("the job index is closed: the server is stopping"))
            return future
        return self._thread.submit(self._guarded, function, *args)

    def _guarded(self, function: Callable[..., T], *args: Any) -> T:
        try:
            return function(*args)
        except IndexUnavailable:
            raise  # logged where it was found
        except Exception:
            log.exception("the job index failed (it is rebuilt from the job folders at start)")
            raise

    # --- in the index's thread ---------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            if time.monotonic() < self._retry_at:
                raise IndexUnavailable("it could not be made a moment ago", RETRY_SECONDS)
            try:
                self._db, self._was_clean = self._open_or_remake()
            except (OSError, sqlite3.Error) as exc:
                raise self._unavailable(exc) from exc
        return self._db

    def _open_or_remake(self) -> tuple[sqlite3.Connection, bool]:
        try:
            return open_index(self.layout)
        except sqlite3.DatabaseError as exc:
            log.warning("the job index %s cannot be used (%s): making it again", self.path, exc)
            delete_index(self.layout)
            return open_index(self.layout)[0], False

    def _ready(self) -> sqlite3.Connection:
        """The connection, its rows as good as the sidecars: after damage or a failure, a
        reconciliation runs first."""
        if self._stale:
            self._reconcile()
        return self._connection()

    def _drop(self) -> None:
        """Close the file as it is: not marked clean, so the next open reads every sidecar."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        self._stale = True

    def _rebuild(self, damage: BaseException) -> None:
        """Damage found: the file deleted and made again from every sidecar."""
        log.warning("the job index %s is damaged (%s): making it again", self.path, damage)
        self._drop()
        try:
            delete_index(self.layout)
        except OSError as exc:
            raise self._unavailable(exc) from exc
        self._reconcile()

    def _unavailable(self, exc: BaseException) -> IndexUnavailable:
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

    def _flush_later(self) -> None:
        """Write the queued changes in one transaction, after waiting a little for more.

        One transaction per change cost a POST about 0.4 ms more at p50 (bench `post`): this
        thread's Python work takes the GIL from the event loop right when it answers. Nothing
        is lost by waiting: a page asked for does not wait (it wakes this flush, which is
        ahead of it in this thread), the close writes what is queued, and after a crash the
        next start reads every sidecar again.
        """
        with self._queue_changed:
            self._queue_changed.wait_for(lambda: self._readers or self._closed, WRITE_DELAY)
            changes, self._queued = self._queued, {}
            self._flush_pending = False
        if changes:
            self._write(list(changes.items()))

    def _write(self, changes: list[tuple[Key, NewRow | None]]) -> None:
        # Unavailable (logged): the changes stay in `_unwritten`; the close marks nothing clean.
        with contextlib.suppress(IndexUnavailable):
            self._write_pending(changes)

    def _write_pending(self, changes: list[tuple[Key, NewRow | None]]) -> None:
        self._unwritten.update(changes)
        try:
            db = self._connection()
            pending = list(self._unwritten.items())
            output = str(self.layout.output)
            gone = [key for key, row in pending if row is None]
            rows = [
                (*key, created, status, _mtime(os.path.join(output, *key, SIDECAR)), item, crc_)
                for key, row in pending
                if row is not None
                for _, _, created, status, item, crc_ in (row,)
            ]
            # One call each: the rows are bound in C, so this thread takes the GIL from the
            # event loop as little as it can.
            db.execute("BEGIN")
            db.executemany("DELETE FROM jobs WHERE endpoint = ? AND id = ?", gone)
            db.executemany("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                if self._db is not None and self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            if is_damage(exc):
                self._rebuild(exc)  # from the sidecars, which these changes are already in
            else:
                log.warning("could not update the job index (%s): tried again with the next", exc)
            return
        for key, row in pending:
            if self._unwritten.get(key) is row:
                del self._unwritten[key]

    def _page(
        self, statuses: list[str], endpoints: list[str], after: Place | None, limit: int
    ) -> list[Row]:
        try:
            return read_page(self._ready(), statuses, endpoints, after, limit)
        except (sqlite3.DatabaseError, Damaged) as exc:
            if not is_damage(exc):
                log.warning("could not read the job index %s: %s", self.path, exc)
                raise IndexUnavailable(str(exc), RETRY_SECONDS) from exc
            self._rebuild(exc)
        try:
            return read_page(self._ready(), statuses, endpoints, after, limit)
        except (sqlite3.DatabaseError, Damaged) as exc:
            raise self._unavailable(exc) from exc

    def _reconcile(self) -> int:
        try:
            try:
                return self._reconcile_once()
            except sqlite3.DatabaseError as exc:
                if not is_damage(exc):
                    raise
                log.warning("the job index %s is damaged (%s): making it again", self.path, exc)
                self._drop()
                delete_index(self.layout)
                return self._reconcile_once()
        except (OSError, sqlite3.Error) as exc:
            raise self._unavailable(exc) from exc

    def _reconcile_once(self) -> int:
        db = self._connection()
        trusted = self._was_clean
        known: dict[Key, int] = {
            (endpoint, id_): mtime
            for endpoint, id_, mtime in db.execute("SELECT endpoint, id, mtime FROM jobs")
        }
        seen: set[Key] = set()
        read = 0
        db.execute("BEGIN")
        for endpoint, job_id, sidecar in self._sidecars():
            key = (endpoint, job_id)
            mtime = _mtime(sidecar)
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
        gone = [key for key in known if key not in seen]
        db.executemany("DELETE FROM jobs WHERE endpoint = ? AND id = ?", gone)
        db.execute("COMMIT")
        self._was_clean, self._stale = True, False  # the rows are as good as the sidecars
        if not trusted:
            # Every sidecar was read, each at least as new as a change SQLite refused before.
            self._unwritten.clear()
        if read or gone:
            log.info("job index: %d sidecar(s) read, %d row(s) removed", read, len(gone))
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

    def _close(self) -> None:
        with self._queue_changed:
            changes, self._queued = self._queued, {}
        if changes:
            self._write(list(changes.items()))
        if self._db is None:
            return
        if self._unwritten:
            self._write([])
        if self._db is None:
            return  # made again and failed: nothing to mark
        with contextlib.suppress(sqlite3.Error):
            if not (self._stale or self._unwritten):
                mark_clean(self._db)
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()
        self._db = None


def _mtime(path: os.PathLike[str] | str) -> int:
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
