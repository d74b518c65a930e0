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

Here: the thread, the order of operations and the page reads. The batched writer is in
indexwriter.py; the connection kept as good as the sidecars (the reconciliation, the rebuild
after damage) in indexreconcile.py; the file itself in indexfile.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from sd_rest.state.indexfile import Damaged, is_damage, read_page
from sd_rest.state.indexreconcile import RETRY_SECONDS, IndexReconciler, NewRow, row_of
from sd_rest.state.indexwriter import IndexWriter
from sd_rest.state.items import IndexClosed, IndexUnavailable, Place, Row
from sd_rest.state.jobs import Job, Status
from sd_rest.state.layout import Key, Layout

log = logging.getLogger(__name__)

T = TypeVar("T")


class JobIndex:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.path = layout.index_file
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="job-index")
        self._reconciler = IndexReconciler(layout)
        self._writer = IndexWriter(self._reconciler)
        self.reconciling: Future[int] | None = None

    # --- what the store and recovery call (any thread; never blocks) -------------------

    def put(self, job: Job) -> None:
        self._queue((job.endpoint, job.id), row_of(job))

    def remove(self, endpoint: str, job_id: str) -> None:
        self._queue((endpoint, job_id), None)

    def _queue(self, key: Key, row: NewRow | None) -> None:
        if self._writer.queue(key, row):
            self._submit(self._writer.flush_later)

    def reconcile(self) -> Future[int]:
        """Bring the index in line with the job folders (see the module's docstring); the
        future gives how many sidecars were read."""
        self.reconciling = self._submit(self._reconciler.reconcile)
        return self.reconciling

    async def page(
        self, statuses: Iterable[Status], endpoints: Iterable[str], after: Place | None, limit: int
    ) -> list[Row]:
        """Up to `limit` rows with one of `statuses` and `endpoints`, newest first, from just
        after `after`."""
        values = sorted(status.value for status in statuses)
        self._writer.reader_waiting()
        try:
            future = self._submit(self._page, values, sorted(endpoints), after, limit)
        except BaseException:
            self._writer.reader_done()
            raise
        future.add_done_callback(lambda _: self._writer.reader_done())
        return await asyncio.wrap_future(future)

    @property
    def closed(self) -> bool:
        return self._writer.closed

    def close(self) -> None:
        """Write what is left, mark the file as closed in order, stop the thread (blocking)."""
        if self.closed:
            return
        self._writer.close()
        with contextlib.suppress(RuntimeError):
            self._thread.submit(self._close).result()
        self._thread.shutdown(wait=True)

    def _submit(self, function: Callable[..., T], *args: Any) -> Future[T]:
        if self.closed:
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
            # Damage is mended where it is found (the file made again from the job folders):
            # what comes here is a fault of another kind.
            log.exception("an operation of the job index failed")
            raise

    # --- in the index's thread ---------------------------------------------------------

    def _page(
        self, statuses: list[str], endpoints: list[str], after: Place | None, limit: int
    ) -> list[Row]:
        reconciler = self._reconciler
        try:
            return read_page(reconciler.ready(), statuses, endpoints, after, limit)
        except (sqlite3.DatabaseError, Damaged) as exc:
            if not is_damage(exc):
                log.warning("could not read the job index %s: %s", self.path, exc)
                raise IndexUnavailable(str(exc), RETRY_SECONDS) from exc
            reconciler.rebuild(exc)
        try:
            return read_page(reconciler.ready(), statuses, endpoints, after, limit)
        except (sqlite3.DatabaseError, Damaged) as exc:
            raise reconciler.unavailable(exc) from exc

    def _close(self) -> None:
        self._writer.drain()
        self._reconciler.close()
