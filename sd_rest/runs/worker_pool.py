"""The resident workers (workers.py) a server keeps: at most one per running job, reused while
they last, and replaced after a number of jobs, after an idle time (so unified memory goes back
to macOS), when one advises it (out of memory, an import cut short), dies, or hangs.

Warm start: one worker loads the text-to-image model (warmup.py) when the server starts, and
whenever one leaves for any reason but idleness, a replacement does at once (after the one it
replaces has given its memory back), so that no job waits for the model. A worker stopped for
idleness is not replaced: giving its memory back is the point. A warm-up that fails is not
tried again until a job has succeeded (a script that fails at every start must not loop).

A worker sends a heartbeat every few seconds from a thread of its own; one silent for longer
than `--worker-timeout` (stopped, or hung holding the interpreter lock) is killed: its job is
resumed in a fresh worker as after a crash. A worker that dies unasked is listed as gone in
`GET /` for a while (what `GET /` shows of the workers is in worker_listing.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Final

from sd_rest.runs.warmup import warm_up
from sd_rest.runs.worker_listing import GoneWorkers, how_it_ended, listing
from sd_rest.runs.workers import Worker, WorkerError
from sd_rest.settings import Settings

log = logging.getLogger(__name__)

REAP_EVERY: Final = 5.0  # seconds between checks for idle workers to retire


class WorkerPool:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._idle: list[Worker] = []
        self._busy: set[Worker] = set()
        self._warm: Worker | None = None  # the worker warming up
        self._warming: asyncio.Task[None] | None = None
        self._warm_failed = False
        self._gone = GoneWorkers()
        self._numbers = 0
        self._closing: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    def start(self) -> None:
        """At server start, before any job: the pool's watch, and a warm worker."""
        self._watch()
        self._replace(None)

    def _watch(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._retire_idle()), loop.create_task(self._hung())]

    async def acquire(self, abandon: asyncio.Event) -> Worker | None:
        """A live idle worker, the one warming up once it is warm, or a new one (WorkerError
        if it cannot start). None if `abandon` is set while waiting for the warm one."""
        self._watch()
        while True:
            while self._idle:
                worker = self._idle.pop()
                if worker.alive:
                    self._busy.add(worker)
                    return worker
                self._dispose(worker)
            if self._warming is None:
                break
            if not await _warm_or_abandoned(self._warming, abandon):
                return None
        worker = self._new()
        self._busy.add(worker)
        try:
            await worker.start()
        except BaseException:
            self._busy.discard(worker)
            raise
        return worker

    def _new(self) -> Worker:
        self._numbers += 1
        return Worker(self.settings, self._numbers, self._exited)

    def release(self, worker: Worker) -> None:
        """Back to the pool after a run; or replaced, when it should be."""
        self._busy.discard(worker)
        if worker.last_outcome == "ok":
            self._warm_failed = False
        if worker.alive and worker.jobs >= self.settings.worker_max_jobs:
            worker.retire = worker.retire or f"it has served {worker.jobs} jobs"
        if self._closed:
            self._dispose(worker)
        elif not worker.alive:
            self._gone.add(worker)
            self._replace(None)
        elif worker.retire:
            log.info("replacing worker %d: %s", worker.number, worker.retire)
            self._replace(self._dispose(worker))
        else:
            self._idle.append(worker)

    def _exited(self, worker: Worker) -> None:
        """A worker's process ended (busy and warming ones are seen to by their runs)."""
        if worker in self._idle and not worker.closing and not self._closed:
            log.warning("worker %d ended while idle: %s", worker.number, how_it_ended(worker))
            self._idle.remove(worker)
            self._gone.add(worker)
            self._replace(None)

    def _dispose(self, worker: Worker) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(worker.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task

    # --- warm start -------------------------------------------------------------------

    def _replace(self, after: asyncio.Task[None] | None) -> None:
        """Warm a worker up in the background, after `after` (the one it replaces, ending),
        unless one is idle or warming already, or warm start is off or failed last time."""
        if self._closed or not self.settings.warm_start or self._warm_failed:
            return
        if self._warming is not None or any(w.alive for w in self._idle):
            return
        if not self.settings.text_to_image_model.is_file():
            return  # its jobs get 503 until it exists: nothing to load
        worker = self._warm = self._new()  # listed as warming from now on
        self._warming = asyncio.get_running_loop().create_task(self._warm_up(worker, after))

    async def _warm_up(self, worker: Worker, after: asyncio.Task[None] | None) -> None:
        try:
            if after is not None:
                await asyncio.gather(after, return_exceptions=True)  # its memory back first
            if not self._closed:
                await worker.start()
            if not self._closed:  # (close() may have come while it started)
                finished = await warm_up(worker, self.settings)
                self._warm_failed = finished.outcome != "ok"
        except WorkerError as exc:
            log.warning("no warm worker: %s", exc)
            self._warm_failed = True
        finally:
            self._warm = None
            self._warming = None
            self._settle_warm(worker)

    def _settle_warm(self, worker: Worker) -> None:
        if self._closed or not worker.alive or worker.retire:
            self._gone.add(worker)
            self._dispose(worker)
        else:
            self._idle.append(worker)

    # --- the pool's watch -------------------------------------------------------------

    async def _retire_idle(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY)
            limit = self.settings.worker_idle_seconds
            for worker in list(self._idle):
                if time.monotonic() - worker.last_used > limit:
                    self._idle.remove(worker)
                    log.info(
                        "worker %d idle for %.0f s: giving its memory back", worker.number, limit
                    )
                    self._dispose(worker)

    async def _hung(self) -> None:
        """Kill the workers silent for longer than the limit: hung, or stopped."""
        limit = self.settings.worker_timeout
        period = min(1.0, limit / 4)
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + period
            await asyncio.sleep(period)
            if loop.time() - due > period:
                continue  # the server itself was held up: heartbeats may be waiting unread
            for worker in self._live():
                channel = worker.channel
                watched = channel is not None and worker.alive and worker.silenced is None
                if watched and channel.silence() > limit:
                    worker.silenced = channel.silence()
                    log.error(
                        "worker %d (pid %s) silent for %.0f s (--worker-timeout %g): killing it",
                        worker.number,
                        worker.pid,
                        worker.silenced,
                        limit,
                    )
                    worker.signal_kill()  # its run, or its exit, does the rest

    def _live(self) -> list[Worker]:
        warm = [self._warm] if self._warm is not None else []
        return sorted({*self._busy, *self._idle, *warm}, key=lambda w: w.number)

    def describe(self) -> list[dict[str, Any]]:
        """Each worker's state from what the pool knows (see `listing`): never waits."""
        workers = {*self._live(), *self._gone.recent()}
        return [listing(w, w is self._warm) for w in sorted(workers, key=lambda w: w.number)]

    async def close(self) -> None:
        """At shutdown: every worker ended (busy ones were interrupted by their runners)."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._warm is not None:
            self._warm.end_now()  # nothing to save in a warm-up
        if self._warming is not None:
            await asyncio.gather(self._warming, return_exceptions=True)
        for worker in [*self._idle, *self._busy]:
            self._dispose(worker)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _warm_or_abandoned(warming: asyncio.Task[None], abandon: asyncio.Event) -> bool:
    """Wait for the warm-up to end: True, or False if `abandon` is set first."""
    waiting = asyncio.ensure_future(abandon.wait())
    try:
        await asyncio.wait({warming, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    return not abandon.is_set()
