"""The job index's batched writer (index.py): the store's changes queued from any thread and
written in one transaction, up to `WRITE_DELAY` after they are put, unless a page is waiting
for them or the index is closing; writes SQLite refused are tried again with the next batch.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from os.path import join
from typing import Final

from sd_rest.state.indexfile import is_damage
from sd_rest.state.indexreconcile import IndexReconciler, NewRow, sidecar_mtime
from sd_rest.state.items import IndexUnavailable
from sd_rest.state.layout import SIDECAR, Key

log = logging.getLogger(__name__)

WRITE_DELAY: Final = 0.05  # seconds a change may wait to be written with the ones after it


class IndexWriter:
    def __init__(self, reconciler: IndexReconciler) -> None:
        self._reconciler = reconciler
        self._output = str(reconciler.layout.output)
        self._closed = False
        # Changes wait here to be written together (see `flush_later`).
        self._queued: dict[Key, NewRow | None] = {}
        self._flush_pending = False  # a `flush_later` is in the thread's queue
        self._readers = 0  # pages asked for and not yet read: they want the changes now
        self._queue_changed = threading.Condition()

    # --- any thread; never blocks ---------------------------------------------------------

    def queue(self, key: Key, row: NewRow | None) -> bool:
        """Queue a change (None: the row goes); whether a `flush_later` must be submitted to
        the index's thread for it."""
        with self._queue_changed:
            self._queued[key] = row
            if self._flush_pending or self._closed:
                return False  # the close writes what is queued
            self._flush_pending = True
        return True

    def reader_waiting(self) -> None:
        with self._queue_changed:
            self._readers += 1  # a flush waiting ahead of this page goes at once
            self._queue_changed.notify_all()

    def reader_done(self) -> None:
        with self._queue_changed:
            self._readers -= 1

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """No flush is asked for from now on; one waiting goes at once (`drain` writes the
        rest)."""
        with self._queue_changed:
            self._closed = True
            self._queue_changed.notify_all()

    # --- in the index's thread ------------------------------------------------------------

    def flush_later(self) -> None:
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

    def drain(self) -> None:
        """At the close: what is queued written, and the writes refused before tried again."""
        with self._queue_changed:
            changes, self._queued = self._queued, {}
        if changes:
            self._write(list(changes.items()))
        if self._reconciler.is_open and self._reconciler.unwritten:
            self._write([])

    def _write(self, changes: list[tuple[Key, NewRow | None]]) -> None:
        # Unavailable (logged): the changes stay unwritten; the close marks nothing clean.
        with contextlib.suppress(IndexUnavailable):
            self._write_pending(changes)

    def _write_pending(self, changes: list[tuple[Key, NewRow | None]]) -> None:
        unwritten = self._reconciler.unwritten
        unwritten.update(changes)
        try:
            db = self._reconciler.connection()
            pending = list(unwritten.items())
            output = self._output
            gone = [key for key, row in pending if row is None]
            rows = [
                (*key, created, status, sidecar_mtime(join(output, *key, SIDECAR)), item, crc_)
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
            self._reconciler.rollback()
            if is_damage(exc):
                # From the sidecars, which these changes are already in.
                self._reconciler.rebuild(exc)
            else:
                log.warning("could not update the job index (%s): tried again with the next", exc)
            return
        for key, row in pending:
            if unwritten.get(key) is row:
                del unwritten[key]
