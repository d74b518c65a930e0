"""The third runner (--broker): the job is handed to the worker hosts through Redis and
followed there. It enqueues the job (or, after a restart of this node, finds it already in
Redis and follows it), and turns its stream's entries into the same sink calls a local run
makes (cluster.md, "The API node reading"): a new attempt starts the job (again), only the
current attempt's entries count, each image is written here atomically, published, then
counted as kept in Redis; the end is the outcome. A cancel tells the worker host and answers
within CANCEL_WAIT; a stop (this node is stopping) leaves Redis alone for the next start."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Final

from sd_rest.cluster import keys
from sd_rest.cluster.connection import FAILURES
from sd_rest.cluster.entries import End, Entry, Image, Progress, Started
from sd_rest.cluster.message import Checkpoint, JobMessage
from sd_rest.endpoints import ENDPOINTS
from sd_rest.runs.remote_files import InputsUnreadable, append_log, message_for
from sd_rest.runs.remote_jobs import RemoteJobs
from sd_rest.runs.seam import Outcome, OutcomeKind, RunSink
from sd_rest.settings import Model
from sd_rest.state.files import write_atomic
from sd_rest.state.jobs import ImageRecord, Job, RemoteWorker, Status
from sd_rest.state.store import JobStore

log = logging.getLogger(__name__)

# A DELETE answers within 2 s (RunningJobs.CANCEL_WAIT): the worker host's own end is awaited
# this long, then the job is CANCELED here whatever it does.
CANCEL_WAIT: Final = 1.5
RETRY_FIRST: Final = 0.2
RETRY_MOST: Final = 5.0
REDIS_FAILURES: Final = FAILURES


class RemoteRunner:
    def __init__(self, remote: RemoteJobs, store: JobStore, job: Job, sink: RunSink) -> None:
        self.remote = remote
        self.redis = remote.node.redis
        self.store = store
        self.job = job
        self.sink = sink
        self._key = (job.endpoint, job.id)
        self.stream = keys.stream(job.endpoint, job.id)
        # The attempt whose entries count: kept in the sidecar across restarts of this node.
        self._attempt = job.worker.attempt if job.worker is not None else None
        self._outcome: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._checkpoint: Checkpoint | None = None
        self._attached = False  # in Redis and followed
        self._tasks: list[asyncio.Task[None]] = []

    # --- control ----------------------------------------------------------------------

    def cancel(self) -> None:
        self._tasks.append(asyncio.create_task(self._cancel()))

    def stop(self, grace: float) -> None:
        self._settle(Outcome(OutcomeKind.STOPPED))

    def _settle(self, outcome: Outcome) -> None:
        if not self._outcome.done():
            self._outcome.set_result(outcome)

    async def _cancel(self) -> None:
        if not self._attached:
            self._settle(Outcome(OutcomeKind.CANCELED))  # no worker host can have it yet
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_WAIT
        try:
            await asyncio.wait_for(self.redis.cancel(*self._key), CANCEL_WAIT)
        except REDIS_FAILURES as exc:
            log.warning("job %s/%s: the cancel could not reach Redis: %s", *self._key, exc)
        with contextlib.suppress(asyncio.TimeoutError):
            # The worker's own end (canceled, or complete if it had just finished) first.
            await asyncio.wait_for(asyncio.shield(self._outcome), deadline - loop.time())
        self._settle(Outcome(OutcomeKind.CANCELED))

    # --- the run ----------------------------------------------------------------------

    async def run(self) -> Outcome:
        self._tasks.append(asyncio.create_task(self._attach()))
        try:
            outcome = await self._outcome
        finally:
            self.remote.node.follower.unfollow(self.stream)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.job.set_waiting(None)
        if outcome.kind is not OutcomeKind.STOPPED:
            await self.remote.node.forget(*self._key)  # nothing in Redis outlives the job
        return outcome

    async def _attach(self) -> None:
        """Find the job in Redis or enqueue it, then follow its stream; retried with backoff
        while Redis cannot be reached."""
        model = ENDPOINTS[self.job.endpoint].model
        # Hashed if this node has the file (a background thread; cached), else named.
        self._checkpoint = await self.remote.checkpoint(Path(self.job.checkpoint))
        self._tasks.append(asyncio.create_task(self._say_why_waiting(model, self._checkpoint)))
        delay = RETRY_FIRST
        while True:
            try:
                await self._find_or_enqueue()
                return
            except InputsUnreadable as exc:
                self._settle(Outcome.failed(str(exc)))
                return
            except REDIS_FAILURES as exc:
                if delay == RETRY_FIRST:
                    log.warning("job %s/%s waits for Redis: %s", *self._key, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MOST)

    async def _find_or_enqueue(self) -> None:
        state = await self.redis.job(*self._key)
        if state is None:
            await self._enqueue()
            return
        # This node restarted (or Redis came back): the job is there; it is followed, not
        # enqueued again, unless the message may not have reached Dramatiq.
        await self.redis.ensure_group(self.stream)
        worker = self.job.worker
        if state.get("worker") and worker is not None and self.job.status is Status.QUEUED:
            await self.sink.started(None, worker)  # it still runs on the attempt it ran on
        self._follow()  # after: its entries find the job started
        if state.get("enqueued") != "1":
            await self.redis.send(state.get("queue") or self._queue(), await self._message())

    async def _enqueue(self) -> None:
        message = await self._message()
        await self.redis.create(*self._key, self._queue(), len(self.job.images))
        self._follow()
        await self.redis.send(self._queue(), message)

    def _queue(self) -> str:
        assert self._checkpoint is not None
        return keys.queue_for(self._checkpoint.name, self._checkpoint.sha256)

    def _follow(self) -> None:
        self._attached = True
        self.remote.node.follower.follow(self.stream, self)

    async def _message(self) -> JobMessage:
        assert self._checkpoint is not None
        return await message_for(self.store, self.job, self._checkpoint)

    async def _say_why_waiting(self, model: Model, checkpoint: Checkpoint) -> None:
        """While no worker host has started the job: why it waits, when none can take it
        (looked at again at each refresh of the worker hosts)."""
        while True:
            queued = self.job.status is Status.QUEUED
            self.job.set_waiting(self.remote.waiting(model, checkpoint) if queued else None)
            await self.remote.node.registry.changed()

    # --- the stream (called by the follower, in stream order) ---------------------------

    async def redis_back(self) -> None:
        """Redis answers again: a job it lost (restarted without persistence) is enqueued
        again, resuming at the images kept here."""
        if self._outcome.done():
            return
        state = await self.redis.job(*self._key)
        if state is not None:
            await self.redis.ensure_group(self.stream)
            return
        log.warning("job %s/%s: Redis lost it; enqueued again", *self._key)
        if self.job.status is Status.IN_PROGRESS:
            await self.sink.requeued()
        self._attempt = None
        try:
            await self._enqueue()
        except InputsUnreadable as exc:
            self._settle(Outcome.failed(str(exc)))

    async def entry(self, entry: Entry) -> None:
        if self._outcome.done():
            return
        if isinstance(entry, Started):
            await self._started(entry)
            return
        if entry.attempt != self._attempt:
            # A superseded attempt's late entry; or the end the fence adds under a new
            # attempt that never started (its worker died too often).
            if not isinstance(entry, End) or not await self._current(entry.attempt):
                return
            self._attempt = entry.attempt
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
        if entry.attempt == self._attempt and self.job.status is Status.IN_PROGRESS:
            return  # read again (it was not acknowledged)
        self._attempt = entry.attempt
        worker = RemoteWorker(entry.worker.host, entry.worker.pid, entry.attempt)
        await self.sink.started(None, worker)

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
        await self.redis.kept(*self._key, entry.n)

    async def _end(self, entry: End) -> None:
        if entry.log_tail:
            await asyncio.to_thread(append_log, self.store, self.job, entry)
        if entry.outcome == "stopped":  # its worker host is stopping: it is delivered again
            self._attempt = None
            await self.sink.requeued()
            return
        self._settle(final_outcome(entry, len(self.job.images), self.job.total_images))


def final_outcome(entry: End, kept: int, total: int) -> Outcome:
    """The outcome of a run whose worker host ended it (not `stopped`), with `kept` of the
    job's `total` images kept here."""
    if kept >= total:
        return Outcome(OutcomeKind.COMPLETE)
    if entry.outcome == "canceled":
        return Outcome(OutcomeKind.CANCELED)
    if entry.outcome == "complete":
        return Outcome.failed(f"its worker host ended with {kept} of {total} images")
    return Outcome.failed(entry.error or "the job failed on its worker host")
