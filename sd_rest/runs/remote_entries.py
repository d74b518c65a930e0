"""A remote job's stream entries, in stream order, turned into the sink calls a local run
makes (cluster.md, "The API node reading"): a new attempt starts the job (again), only the
current attempt's entries count, each image is written here atomically and published; the
end settles the outcome (remote_runner.py owns the run)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable

from sd_rest.cluster.connection import NodeRedis
from sd_rest.cluster.entries import End, Entry, Image, Progress, Started
from sd_rest.runs.remote_files import append_log, final_outcome
from sd_rest.runs.seam import Outcome, RunSink
from sd_rest.state.files import write_atomic
from sd_rest.state.jobs import ImageRecord, Job, RemoteWorker, Status
from sd_rest.state.lifecycle import IllegalTransition
from sd_rest.state.store import JobStore

log = logging.getLogger(__name__)


class RemoteEntries:
    def __init__(
        self,
        redis: NodeRedis,
        store: JobStore,
        job: Job,
        sink: RunSink,
        settle: Callable[[Outcome], None],
        settled: Callable[[], bool],
    ) -> None:
        self.redis = redis
        self.store = store
        self.job = job
        self.sink = sink
        self._key = (job.endpoint, job.id)
        self._settle = settle
        self._settled = settled
        # The attempt whose entries count, and its worker: kept in the sidecar.
        self.worker = job.worker
        self.attempt = job.worker.attempt if job.worker is not None else None
        # Held by each entry, and by the run's own transitions (a restart's start, a host
        # found gone): one at a time.
        self.lock = asyncio.Lock()

    async def entry(self, entry: Entry) -> None:
        if self._settled():
            return
        try:
            async with self.lock:
                await self._entry(entry)
        except IllegalTransition:
            if not self._settled():
                raise
            # Canceled here meanwhile (the cancel does not wait longer): nothing to do.

    async def _entry(self, entry: Entry) -> None:
        if isinstance(entry, Started):
            await self._started(entry)
            return
        if entry.attempt != self.attempt:
            # A superseded attempt's late entry; or the end the fence adds under a new
            # attempt that never started (its worker died too often).
            if not isinstance(entry, End) or not await self._current(entry.attempt):
                return
            self.attempt = entry.attempt
        elif self.job.status is Status.QUEUED and self.worker and not isinstance(entry, End):
            # Its worker host was taken for dead here, yet it goes on: it runs it again.
            await self.sink.started(None, self.worker)
        if isinstance(entry, Progress):
            if self.job.status is Status.IN_PROGRESS:
                self.sink.progress(entry.index, entry.fraction)
        elif isinstance(entry, Image):
            await self._image(entry)
        elif isinstance(entry, End):
            await self._end(entry)

    async def _current(self, attempt: str) -> bool:
        state = await self.redis.job(*self._key)
        return state is not None and state.get("attempt") == attempt

    async def _started(self, entry: Started) -> None:
        if entry.attempt == self.attempt and self.job.status is Status.IN_PROGRESS:
            return  # read again (it was not acknowledged)
        self.attempt = entry.attempt
        self.worker = RemoteWorker(
            entry.worker.host, entry.worker.pid, entry.attempt, entry.worker.worker_id
        )
        await self.sink.started(None, self.worker)

    async def _image(self, entry: Image) -> None:
        kept = len(self.job.images)
        if entry.n <= kept:
            return  # kept already (a re-read entry, or an attempt that made it again)
        if entry.n != kept + 1 or self.job.status is not Status.IN_PROGRESS:
            log.warning(
                "job %s/%s: image %d skipped: %d kept, status %s",
                *self._key, entry.n, kept, self.job.status.value,
            )  # fmt: skip
            return
        path = self.store.layout.image(*self._key, entry.n)
        await asyncio.to_thread(write_atomic, path, entry.png)
        digest = hashlib.sha256(entry.png).hexdigest()
        await self.sink.published(ImageRecord(entry.n, entry.seed, entry.position, digest))

    async def _end(self, entry: End) -> None:
        if entry.log_tail:
            await asyncio.to_thread(append_log, self.store, self.job, entry)
        if entry.outcome == "stopped":  # its worker host is stopping: it is delivered again
            self.attempt = None
            await self.sink.requeued()
            return
        self._settle(final_outcome(entry, len(self.job.images), self.job.total_images))
