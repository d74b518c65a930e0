"""Waiting jobs in submission order, and `concurrency` workers that run them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .jobs import Job

log = logging.getLogger(__name__)

Key = tuple[str, str]


class QueueFull(Exception):
    pass


class Place:
    """A place in the queue held for a job being stored: taken by `JobQueue.put`, or given
    back by `release` (idempotent). Reserved before the first `await` of a submission, so
    submissions that arrive together cannot all pass the room check."""

    __slots__ = ("_queue",)

    def __init__(self, queue: JobQueue) -> None:
        self._queue: JobQueue | None = queue

    def release(self) -> None:
        if self._queue is not None:
            self._queue._reserved -= 1
            self._queue = None


class JobQueue:
    def __init__(
        self, concurrency: int, max_waiting: int, run: Callable[[Job], Awaitable[None]]
    ) -> None:
        self.concurrency = concurrency
        self.max_waiting = max_waiting
        self._run = run
        self._waiting: dict[Key, Job] = {}  # insertion order is submission order
        self._reserved = 0  # places held by submissions still being stored
        self._changed = asyncio.Condition()
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False

    @staticmethod
    def key(job: Job) -> Key:
        return (job.endpoint, job.id)

    def __contains__(self, job: Job) -> bool:
        return self.key(job) in self._waiting

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def reserve(self) -> Place | None:
        """A place for one more job, or None when waiting and reserved places fill the queue."""
        if len(self._waiting) + self._reserved >= self.max_waiting:
            return None
        self._reserved += 1
        return Place(self)

    def full_error(self) -> QueueFull:
        return QueueFull(f"the queue is full ({self.max_waiting} jobs waiting)")

    async def put(self, job: Job, place: Place | None = None) -> None:
        """Queue `job`, in the place reserved for it (recovered jobs need none)."""
        if place is not None:
            place.release()
        self._waiting[self.key(job)] = job
        async with self._changed:
            self._changed.notify()

    def remove(self, job: Job) -> bool:
        return self._waiting.pop(self.key(job), None) is not None

    def start(self) -> None:
        for number in range(self.concurrency):
            self._workers.append(asyncio.create_task(self._worker(), name=f"worker-{number}"))

    def stop_taking(self) -> None:
        """No worker starts another job (waiting ones stay where they are)."""
        self._closed = True

    async def close(self) -> None:
        """Stop taking jobs; running ones are the caller's to stop. Waits for the workers."""
        self._closed = True
        async with self._changed:
            self._changed.notify_all()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def _next(self) -> Job | None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._closed or bool(self._waiting))
            if self._closed:
                return None
            key = next(iter(self._waiting))
            return self._waiting.pop(key)

    async def _worker(self) -> None:
        while True:
            job = await self._next()
            if job is None:
                return
            try:
                await self._run(job)
            except Exception:
                log.exception("running %s/%s failed", job.endpoint, job.id)
