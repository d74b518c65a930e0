"""Waiting jobs in submission order, and `concurrency` workers that run them; where each
waiting job stands (its position, 1 = next), told to `on_moved` whenever it changes.

Unbounded (`concurrency` None: remote runs, --broker): every job is handed to its runner as
soon as it is queued (the worker hosts bound the work), yet it is counted and placed as waiting
until a worker host starts it (`taken`), and again if its run is handed back (`rejoined`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from sd_rest.state.jobs import Job

log = logging.getLogger(__name__)

Key = tuple[str, str]


Moved = Callable[[Iterable[tuple[Job, int]]], None]


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
        self, concurrency: int | None, max_waiting: int, run: Callable[[Job], Awaitable[None]]
    ) -> None:
        self.concurrency = concurrency
        self.max_waiting = max_waiting
        self._run = run
        self._waiting: dict[Key, Job] = {}  # insertion order is submission order
        self._reserved = 0  # places held by submissions still being stored
        self._changed = asyncio.Condition()
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False
        self._started = False
        self._handed: set[Key] = set()  # unbounded: waiting jobs whose run has begun
        self._taken: set[Key] = set()  # taken by a worker, until its run returns
        self._positions: dict[Key, int] | None = None  # made again after each change
        # Told every job whose position changed, with the new one (0: taken by a worker).
        self.on_moved: Moved | None = None

    @staticmethod
    def key(job: Job) -> Key:
        return (job.endpoint, job.id)

    def __contains__(self, job: Job) -> bool:
        return self.key(job) in self._waiting

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def position(self, job: Job) -> int | None:
        """1 for the next job to start, 2 for the one after...; 0 once a worker has taken it
        (its run is starting); None when it is not in the queue."""
        key = self.key(job)
        if key in self._taken:
            return 0
        if self._positions is None:
            self._positions = {k: n for n, k in enumerate(self._waiting, 1)}
        return self._positions.get(key)

    def _moved(self, jobs: Iterable[tuple[Job, int]]) -> None:
        self._positions = None
        self._told(jobs)

    def _told(self, jobs: Iterable[tuple[Job, int]]) -> None:
        if self.on_moved is not None:
            self.on_moved(jobs)

    def _left(self, index: int) -> None:
        """The job at `index` (0-based) left: every job behind it moved up by one."""
        behind = list(self._waiting.values())[index:]
        self._moved((job, index + n) for n, job in enumerate(behind, 1))

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
        key = self.key(job)
        joined = key not in self._waiting
        self._waiting[key] = job
        position = len(self._waiting)
        if joined and self._positions is not None:
            # Joining at the end moves no one else: the table stays good (a POST is O(1)).
            self._positions[key] = position
            self._told([(job, position)])
        else:
            self._moved([(job, position)])
        if self.concurrency is None:
            self._hand(job)
            return
        async with self._changed:
            self._changed.notify()

    def _hand(self, job: Job) -> None:
        """Unbounded: run `job` now (it stays counted as waiting until `taken`)."""
        key = self.key(job)
        if not self._started or self._closed or key in self._handed:
            return
        self._handed.add(key)
        self._workers.append(asyncio.create_task(self._run_one(job)))

    async def _run_one(self, job: Job) -> None:
        key = self.key(job)
        try:
            await self._run(job)
        except Exception:
            log.exception("running %s/%s failed", job.endpoint, job.id)
        finally:
            self._handed.discard(key)
            self._taken.discard(key)
            if key in self._waiting:  # ended before a worker host started it
                self.remove(job)
            self._positions = None
            self._workers = [task for task in self._workers if not task.done()]

    def taken(self, job: Job) -> None:
        """Unbounded: a worker host started `job`: it no longer waits (position 0)."""
        key = self.key(job)
        if self.concurrency is None and key in self._waiting:
            self.remove(job)
            self._taken.add(key)
            self._moved([(job, 0)])

    def rejoined(self, job: Job) -> None:
        """Unbounded: `job`'s run was handed back: it waits again, in submission order."""
        key = self.key(job)
        if self.concurrency is None and key not in self._waiting:
            self._taken.discard(key)
            jobs = sorted([*self._waiting.values(), job], key=lambda j: j.seq)
            self._waiting = {self.key(j): j for j in jobs}
            index = jobs.index(job)
            self._moved((j, n) for n, j in enumerate(jobs[index:], index + 1))

    def remove(self, job: Job) -> bool:
        key = self.key(job)
        if key not in self._waiting:
            return False
        index = list(self._waiting).index(key)
        del self._waiting[key]
        self._left(index)
        return True

    def start(self) -> None:
        self._started = True
        if self.concurrency is None:
            for job in list(self._waiting.values()):
                self._hand(job)
            return
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
            job = self._waiting.pop(key)
            self._taken.add(key)
            self._moved([(job, 0)])
            self._left(0)
            return job

    async def _worker(self) -> None:
        while True:
            job = await self._next()
            if job is None:
                return
            try:
                await self._run(job)
            except Exception:
                log.exception("running %s/%s failed", job.endpoint, job.id)
            finally:
                self._taken.discard(self.key(job))
                self._positions = None
