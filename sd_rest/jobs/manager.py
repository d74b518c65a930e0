"""Submitting, finding, canceling and running jobs: the layer between the routes and the
store, queue and runners. It owns the decisions (which transition, when); the store makes
them durable and visible, runners run."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sd_rest.endpoints import ENDPOINTS
from sd_rest.errors import ApiError
from sd_rest.fields import Params
from sd_rest.jobs.queue import JobQueue, Place
from sd_rest.jobs.recovery import Recovery
from sd_rest.runs import pty_process
from sd_rest.runs.provenance import provenance_for
from sd_rest.runs.runners import Runners
from sd_rest.runs.seam import Outcome, OutcomeKind, Runner, RunnerFactory
from sd_rest.settings import Settings
from sd_rest.state import lifecycle
from sd_rest.state.disk import format_size, free_bytes, is_disk_full, job_bytes
from sd_rest.state.events import JobEvents
from sd_rest.state.jobs import ImageRecord, Job, Status, job_id
from sd_rest.state.layout import Key, Layout
from sd_rest.state.store import JobStore

log = logging.getLogger(__name__)

CANCEL_WAIT = 2.0  # seconds a DELETE waits for a running job to end


class _JobSink:
    """What a runner reports, turned into the job's transitions (see runners.RunSink)."""

    def __init__(self, store: JobStore, job: Job) -> None:
        self.store = store
        self.job = job

    async def started(self, pid: int | None) -> None:
        await self.store.commit(self.job, lifecycle.start(self.job, pid, time.time()))

    def progress(self, index: int, fraction: float) -> None:
        if self.job.set_progress(index, fraction):
            self.store.events.emit(self.job, "progress", self.job.progress)

    async def published(self, record: ImageRecord) -> None:
        await self.store.commit(self.job, lifecycle.publish(self.job, record))


class JobManager:
    def __init__(
        self,
        settings: Settings,
        store: JobStore | None = None,
        runners: RunnerFactory | None = None,
    ) -> None:
        self.settings = settings
        if store is None:
            store = JobStore(Layout(settings.output), JobEvents(), settings.finished_cache)
        self.store = store
        self.events = store.events
        self.recovery = Recovery(self.store)
        self.runners: Runners | RunnerFactory = runners or Runners(settings, self.store)
        self.queue = JobQueue(settings.concurrency, settings.max_queue, self._run)
        self.queue.on_moved = self._moved
        self._running: dict[Key, tuple[Runner, asyncio.Future[None]]] = {}
        self._submitting: dict[Key, asyncio.Lock] = {}
        self._last_seq = 0
        self.closing = False
        self._stop_sweep = threading.Event()
        self._sweeper: asyncio.Future[None] | None = None
        # The checkpoints' digests and the fork's commit, for the images' metadata.
        self.provenance = provenance_for(settings.output, settings.repository)

    # --- start and stop ---------------------------------------------------------------

    def recover(self) -> list[Job]:
        """Before serving: the unfinished jobs on disk, ready to run again in order."""
        unfinished = self.recovery.recover()
        for job in unfinished:
            self._last_seq = max(self._last_seq, job.seq)
        return unfinished

    async def start(self, unfinished: list[Job]) -> None:
        """Queue the recovered jobs (before any new one can be posted: submission order) and
        start the workers; finished jobs are checked in the background."""
        if isinstance(self.runners, Runners):
            self.runners.start()  # a worker warming up before the first job asks for one
        for job in unfinished:
            await self.queue.put(job)
        self.queue.start()
        self.store.start_syncing()  # states the disk refused during recovery
        self._sweeper = asyncio.get_running_loop().run_in_executor(None, self._sweep)
        # Hashing the checkpoints takes seconds: begun now, in its own thread, so the first
        # images usually have it; an image published before it is known goes without it.
        models = (self.settings.text_to_image_model, self.settings.inpaint_image_model)
        self.provenance.start([model.resolve() for model in models])

    def _sweep(self) -> None:
        reconciling = self.store.index.reconciling
        if reconciling is not None:
            # The first listing waits for the index's check of the folders: let it run first
            # (both read every folder; together they take turns at the GIL for seconds).
            concurrent.futures.wait([reconciling])
        try:
            quarantined = self.recovery.sweep(self._stop_sweep)
        except Exception:  # a check in the background must not take the server down
            log.exception("the background check of finished jobs failed")
            return
        if quarantined:
            log.warning("quarantined %d job folder(s) with damaged sidecars", quarantined)

    def stop_taking(self) -> None:
        """From now on POSTs get 503 and no waiting job is started."""
        self.closing = True
        self.queue.stop_taking()

    async def shutdown(self) -> None:
        """Stop taking jobs, interrupt running ones (killed after the grace period) and leave
        them resumable: they are queued again on disk, for the next start."""
        self.stop_taking()
        self._stop_sweep.set()
        self.provenance.close()
        for runner, _ in list(self._running.values()):
            runner.stop(self.settings.shutdown_grace)
        await self.queue.close()
        if self._sweeper is not None:
            await self._sweeper
        await self.store.close()
        if isinstance(self.runners, Runners):
            await self.runners.close()
        await pty_process.closed()

    def _moved(self, moves: Iterable[tuple[Job, int]]) -> None:
        # A waiting job's position is part of its status: a move is a change clients see.
        for job, position in moves:
            self.events.emit(job, "moved", position)

    def position(self, job: Job) -> int | None:
        """Where a job that reads QUEUED stands (1 = next, 0 = its run is starting); None for
        any other job."""
        if job.public_status() is not Status.QUEUED:
            return None
        return self.queue.position(job)

    # --- requests ---------------------------------------------------------------------

    def _next_seq(self) -> int:
        # Nanoseconds since the epoch, never repeated: orders jobs across restarts too.
        self._last_seq = max(self._last_seq + 1, time.time_ns())
        return self._last_seq

    def check_ready(self, endpoint: str) -> Path:
        """503 when this endpoint's jobs cannot run: say so now, not after a model load.
        Returns the checkpoint's path as configured."""
        if self.closing:
            raise ApiError(503, "shutting_down", "the server is shutting down")
        model = ENDPOINTS[endpoint].model
        checkpoint = self.settings.checkpoint(model)
        if not checkpoint.is_file():
            raise ApiError(
                503,
                "model_missing",
                f"the {model.value} model checkpoint is missing: {checkpoint} (see {model.flag})",
            )
        if not self.settings.python.exists():
            raise ApiError(
                503,
                "python_missing",
                f"the scripts' interpreter is missing: {self.settings.python}",
            )
        return checkpoint

    async def submit(
        self, endpoint: str, params: Params, uploads: dict[str, bytes], inputs: dict[str, bytes]
    ) -> Job:
        """`uploads`: the bytes the client sent (they make the id); `inputs`: the files the
        script reads."""
        # Resolved here only (a realpath is a stat per folder): the id names the real file.
        checkpoint = str(self.check_ready(endpoint).resolve())
        digests = {field: hashlib.sha256(data).hexdigest() for field, data in uploads.items()}
        key = (endpoint, job_id(endpoint, params, checkpoint, digests))
        # Before the first await: concurrent submissions must not all see the same free room.
        place = self.queue.reserve()
        lock = self._submitting.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                return await self._submit(key, params, checkpoint, digests, inputs, place)
        finally:
            if place is not None:
                place.release()  # a no-op once the job took it
            if not lock.locked() and self._submitting.get(key) is lock:
                del self._submitting[key]

    async def _submit(
        self,
        key: Key,
        params: Params,
        checkpoint: str,
        digests: dict[str, str],
        inputs: dict[str, bytes],
        place: Place | None,
    ) -> Job:
        endpoint, id_ = key
        existing = await self.store.get(endpoint, id_)
        if existing is not None:
            if existing.status in (Status.FAILED, Status.CANCELED) and key not in self._running:
                self._check_room(place)
                self._check_space(endpoint, params, inputs)
                with _disk_full_is_507():
                    await self.store.restore_inputs(existing, inputs)
                    # Queued anew; images it already has are kept and only the rest are made.
                    await self.store.commit(existing, lifecycle.retry(self._next_seq()))
                await self.queue.put(existing, place)
            return existing
        self._check_room(place)
        self._check_space(endpoint, params, inputs)
        now = time.time()
        job = Job(
            id=id_,
            endpoint=endpoint,
            params=params,
            checkpoint=checkpoint,
            uploads=digests,
            inputs={field: ENDPOINTS[endpoint].input_names()[field] for field in inputs},
            seq=self._next_seq(),
            created_at=now,
            updated_at=now,
        )
        with _disk_full_is_507():
            await self.store.add(job, inputs)
        await self.queue.put(job, place)
        return job

    def _check_room(self, place: Place | None) -> None:
        """429 for a job that needs a place when none could be reserved (a POST of a job that
        exists already needs none, so it is answered even when the queue is full)."""
        if place is None:
            raise ApiError(429, "queue_full", f"{self.queue.full_error()}; try again later")

    def _check_space(self, endpoint: str, params: Params, inputs: dict[str, bytes]) -> None:
        """507 before anything is written when the output disk cannot hold what this job may
        need on top of the space kept free."""
        spec = ENDPOINTS[endpoint]
        width, height = spec.image_size(params, inputs)
        needed = self.settings.min_free_space + job_bytes(spec.total_images(params), width, height)
        free = free_bytes(self.settings.output)
        if free < needed:
            raise ApiError(
                507,
                "disk_full",
                f"the output disk has {format_size(free)} free; this job needs "
                f"{format_size(needed)} ({format_size(self.settings.min_free_space)} kept free "
                "by --min-free-space, plus its images): free some space and try again",
            )

    async def get(self, endpoint: str, id_: str) -> Job | None:
        return self.store.cached(endpoint, id_) or await self.store.get(endpoint, id_)

    async def cancel(self, job: Job) -> Job:
        """QUEUED → CANCELED at once; a running job is ended. Idempotent."""
        if job.status.finished:
            return job
        if self.queue.remove(job):
            await self.store.settle(job, lifecycle.cancel(time.time()))
            return job
        running = self._running.get((job.endpoint, job.id))
        if running is not None:
            runner, done = running
            runner.cancel()
            try:
                await asyncio.wait_for(asyncio.shield(done), CANCEL_WAIT)
            except asyncio.TimeoutError:
                log.warning("job %s did not end within %.1f s of its cancel", job.id, CANCEL_WAIT)
        return job

    # --- running ----------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        if job.status.finished or self.closing:
            return  # canceled while waiting; or left QUEUED for the next start
        if len(job.images) >= job.total_images:
            await self.store.settle(job, lifecycle.complete(time.time()))  # nothing left to make
            return
        key = (job.endpoint, job.id)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            runner = self.runners(job, _JobSink(self.store, job))
            self._running[key] = (runner, done)
            outcome = await runner.run()
        except Exception:
            # The exception's text can name server paths: clients get the id it is logged as.
            incident = secrets.token_hex(8)
            log.exception("job %s/%s failed inside the server (%s)", job.endpoint, job.id, incident)
            outcome = Outcome.failed(
                f"internal server error while running the job; it was logged as {incident}"
            )
        try:
            await self._conclude(job, outcome)
        finally:
            self._running.pop(key, None)
            done.set_result(None)

    async def _conclude(self, job: Job, outcome: Outcome) -> None:
        """The outcome's transition: visible at once, durable as soon as the disk allows."""
        now = time.time()
        if outcome.kind is OutcomeKind.STOPPED:
            if job.status is Status.IN_PROGRESS:
                with contextlib.suppress(OSError):  # then the next start reads IN_PROGRESS
                    await self.store.commit(job, lifecycle.requeue())
            return
        if outcome.kind is OutcomeKind.COMPLETE:
            change = lifecycle.complete(now)
        elif outcome.kind is OutcomeKind.CANCELED:
            change = lifecycle.cancel(now)
        else:
            change = lifecycle.fail(outcome.error or "the job failed", now)
        await self.store.settle(job, change)

    @property
    def running(self) -> int:
        return len(self._running)

    async def workers(self) -> list[dict[str, Any]]:
        """Each resident worker's state (idle or busy, model, jobs served, RSS)."""
        return await self.runners.describe() if isinstance(self.runners, Runners) else []


@contextlib.contextmanager
def _disk_full_is_507() -> Iterator[None]:
    """A POST the disk cannot take: its own status and code, not a generic 500."""
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise ApiError(
            507, "disk_full", "the output disk is full: free some space and try again"
        ) from exc
