"""The third runner (--broker): the job is handed to the worker hosts through Redis and
followed there. It enqueues the job (or, after a restart of this node, finds it already in
Redis and follows it), and turns its stream's entries into the same sink calls a local run
makes (cluster.md, "The API node reading"): a new attempt starts the job (again), only the
current attempt's entries count, each image is written here atomically and published; the
end is the outcome. The job's keys in Redis are deleted once that outcome is durable. A
cancel tells the worker host and answers within CANCEL_WAIT; a stop (this node is stopping)
leaves Redis alone for the next start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Final

import redis as redis_errors

from sd_rest.cluster import keys
from sd_rest.cluster.connection import FAILURES
from sd_rest.cluster.entries import Entry
from sd_rest.cluster.message import Checkpoint, JobMessage
from sd_rest.runs.remote_entries import RemoteEntries
from sd_rest.runs.remote_files import InputsUnreadable, message_for
from sd_rest.runs.remote_jobs import RemoteJobs
from sd_rest.runs.remote_watch import WatchedRun
from sd_rest.runs.seam import Outcome, OutcomeKind, RunSink
from sd_rest.state.jobs import Job, Status
from sd_rest.state.store import JobStore

log = logging.getLogger(__name__)

# A DELETE answers within 2 s (RunningJobs.CANCEL_WAIT): the worker host's own end is awaited
# this long, then the job is CANCELED here whatever it does.
CANCEL_WAIT: Final = 1.5
RETRY_FIRST: Final = 0.2
RETRY_MOST: Final = 5.0


class _Changed(redis_errors.RedisError):
    """The job's hash changed while it was read: read it again (retried like a failure)."""


class RemoteRunner(WatchedRun):
    def __init__(self, remote: RemoteJobs, store: JobStore, job: Job, sink: RunSink) -> None:
        self.remote = remote
        self.redis = remote.node.redis
        self.store = store
        self.job = job
        self.sink = sink
        self._key = (job.endpoint, job.id)
        self.stream = keys.stream(job.endpoint, job.id)
        self._outcome: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.entries = RemoteEntries(
            self.redis, store, job, sink, self._settle, self._outcome.done
        )
        self._checkpoint: Checkpoint | None = None
        self._attached = False  # in Redis and followed
        self._missing_since: float | None = None  # its worker host gone from the registry
        # Since when its worker host, live, has not listed it among its jobs.
        self._unlisted_since: float | None = None
        # _attach's retries and the follower's redis_back may both find or enqueue it: one
        # at a time, or both would create and send it (a second START takes the first,
        # live, host for dead).
        self._enqueueing = asyncio.Lock()
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
        except FAILURES as exc:
            log.warning("job %s/%s: the cancel could not reach Redis: %s", *self._key, exc)
        if self.job.status is Status.QUEUED:
            # No worker has started it (as far as this node knows): a worker that does drops
            # it (canceled=1) or stops at its first entry.
            self._settle(Outcome(OutcomeKind.CANCELED))
        with contextlib.suppress(asyncio.TimeoutError):
            # The worker's own end (canceled, or complete if it had just finished) first.
            await asyncio.wait_for(asyncio.shield(self._outcome), deadline - loop.time())
        self._settle(Outcome(OutcomeKind.CANCELED))

    # --- the run ----------------------------------------------------------------------

    async def run(self) -> Outcome:
        self.remote.runs[self._key] = self
        self._tasks.append(asyncio.create_task(self._attach()))
        try:
            return await self._outcome
        finally:
            self.remote.runs.pop(self._key, None)
            self.remote.node.follower.unfollow(self.stream)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.job.set_waiting(None)

    async def concluded(self) -> None:
        """The outcome is durable: nothing in Redis outlives the job (its end included)."""
        await self.remote.node.forget(*self._key)

    async def _attach(self) -> None:
        """Find the job in Redis or enqueue it, then follow its stream; retried with backoff
        while Redis cannot be reached."""
        # Hashed if this node has the file (one background thread; cached), else named.
        self._checkpoint = await self.remote.checkpoint(Path(self.job.checkpoint))
        await self.refresh()  # why it waits, at once
        delay = RETRY_FIRST
        while True:
            try:
                await self._find_or_enqueue()
                return
            except InputsUnreadable as exc:
                self._settle(Outcome.failed(str(exc)))
                return
            except (*FAILURES, OSError) as exc:  # Redis, or this disk (a restart's start)
                if delay == RETRY_FIRST:
                    log.warning("job %s/%s waits for Redis or the disk: %s", *self._key, exc)
            except Exception as exc:  # a bug: said, and the job ends rather than hangs
                log.exception("job %s/%s could not be handed to the worker hosts", *self._key)
                self._settle(Outcome.failed(f"it could not be handed to the worker hosts: {exc}"))
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MOST)

    async def _find_or_enqueue(self) -> None:
        async with self._enqueueing:  # the hash read again by each, inside
            await self._find_or_enqueue_now()

    async def _find_or_enqueue_now(self) -> None:
        # Followed first: a worker starting it from now on is noticed.
        self._follow(active=False)
        state = await self.redis.job(*self._key)
        if state is not None and state.get("seq") != str(self.job.seq):
            # An earlier run's keys (it was retried since; their deletion failed or this
            # node died before it): its pending end must not settle this run.
            log.warning("job %s/%s: dropping the keys of its earlier run", *self._key)
            if not await self.redis.discard(*self._key, state):
                raise _Changed()
            state = None
        if state is None:
            await self.redis.create(
                *self._key, self._queue(), len(self.job.images), self.job.seq
            )
            self.entries.attempt = None
            await self.redis.send(self._queue(), await self._message())
            return
        # This node restarted (or Redis came back): the job is there; it is followed, not
        # enqueued again, unless the message may not have reached Dramatiq.
        worker = self.job.worker
        async with self.entries.lock:
            if state.get("worker") and worker and self.job.status is Status.QUEUED:
                await self.sink.started(None, worker)  # still on the attempt it ran on
        if state.get("attempt"):
            self.remote.node.follower.activate(self.stream)  # after: entries find it started
        if state.get("enqueued") != "1":
            await self.redis.send(state.get("queue") or self._queue(), await self._message())

    def _queue(self) -> str:
        assert self._checkpoint is not None
        return keys.queue_for(self._checkpoint.name, self._checkpoint.sha256)

    def _follow(self, active: bool) -> None:
        self._attached = True
        job = keys.job(*self._key)
        self.remote.node.follower.follow(self.stream, job, self, active)

    async def _message(self) -> JobMessage:
        assert self._checkpoint is not None
        return await message_for(self.store, self.job, self._checkpoint)

    # --- the stream (called by the follower, in stream order) ---------------------------

    async def redis_back(self) -> None:
        """Redis answers again and the job's hash is gone (Redis restarted without
        persistence) or its message may not have been sent: it is enqueued (again),
        resuming at the images kept here."""
        if self._outcome.done():
            return
        if self.job.status is Status.IN_PROGRESS and await self.redis.job(*self._key) is None:
            log.warning("job %s/%s: Redis lost it; enqueued again", *self._key)
            async with self.entries.lock:
                await self.sink.requeued()
        try:
            await self._find_or_enqueue()
        except InputsUnreadable as exc:
            self._settle(Outcome.failed(str(exc)))

    async def entry(self, entry: Entry) -> None:
        await self.entries.entry(entry)
