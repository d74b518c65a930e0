"""Submitting, finding, canceling and running jobs: the layer between routes and the store,
queue and runners."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .config import Settings
from .disk import format_size, free_bytes, is_disk_full, job_bytes
from .endpoints import ENDPOINTS, INPAINT_IMAGE, total_images
from .errors import ApiError
from .jobs import Job, Params, Status, job_id
from .pngfile import png_size
from .processes import end_orphan
from .queue import JobQueue, Place
from .runner import JobRunner
from .scripts import INPAINT_INPUT_NAME
from .store import JobStore

log = logging.getLogger(__name__)

Key = tuple[str, str]
CANCEL_WAIT = 2.0  # seconds a DELETE waits for a running script to end


class JobManager:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = JobStore(settings.output)
        self.queue = JobQueue(settings.concurrency, settings.max_queue, self._run)
        self._running: dict[Key, tuple[JobRunner, asyncio.Future[None]]] = {}
        self._submitting: dict[Key, asyncio.Lock] = {}
        self._last_seq = 0
        self.closing = False
        self._stop_sweep = threading.Event()
        self._sweeper: asyncio.Future[None] | None = None

    # --- start and stop ---------------------------------------------------------------

    def recover(self) -> list[Job]:
        """Before serving: load unfinished jobs, end any script a dead server left running for
        them, then clear what their interrupted runs left and mark them QUEUED again."""
        unfinished = self.store.recover()
        for job in unfinished:
            if job.pid is not None and end_orphan(job.pid, self.store.script_markers(job)):
                log.warning(
                    "ended script %d left running by a previous server (%s/%s)",
                    job.pid,
                    job.endpoint,
                    job.id,
                )
        for job in unfinished:
            self.store.resume(job)
            self._last_seq = max(self._last_seq, job.seq)
        if unfinished:
            log.info("resuming %d unfinished job(s)", len(unfinished))
        return unfinished

    async def start(self, unfinished: list[Job]) -> None:
        """Queue the recovered jobs (before any new one can be posted: submission order) and
        start the workers; finished jobs are checked in the background."""
        for job in unfinished:
            await self.queue.put(job)
        self.queue.start()
        self.store.start_syncing()  # states the disk refused during recovery
        self._sweeper = asyncio.get_running_loop().run_in_executor(None, self._sweep)

    def _sweep(self) -> None:
        try:
            quarantined = self.store.sweep(self._stop_sweep)
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
        """Stop taking jobs, interrupt running scripts (killed after the grace period) and
        leave their jobs resumable: QUEUED and IN_PROGRESS jobs stay on disk as they are."""
        self.stop_taking()
        self._stop_sweep.set()
        for runner, _ in list(self._running.values()):
            runner.stop(self.settings.shutdown_grace)
        await self.queue.close()
        if self._sweeper is not None:
            await self._sweeper
        await self.store.close()

    # --- requests ---------------------------------------------------------------------

    def _next_seq(self) -> int:
        # Nanoseconds since the epoch, never repeated: orders jobs across restarts too.
        self._last_seq = max(self._last_seq + 1, time.time_ns())
        return self._last_seq

    def check_ready(self, endpoint: str) -> Path:
        """503 when this endpoint's jobs cannot run: say so now, not after a model load."""
        if self.closing:
            raise ApiError(503, "shutting_down", "the server is shutting down")
        checkpoint = self.settings.model_for(ENDPOINTS[endpoint].model)
        if not checkpoint.is_file():
            raise ApiError(
                503,
                "model_missing",
                f"the {ENDPOINTS[endpoint].model} model checkpoint is missing: {checkpoint} "
                f"(see --{ENDPOINTS[endpoint].model}-model)",
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
        """`uploads`: the bytes the client sent (they make the id); `inputs`: the normalised
        PNGs the script reads."""
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
                    await self.store.save(
                        existing,
                        status=Status.QUEUED,
                        seq=self._next_seq(),
                        error=None,
                        finished_at=None,
                    )
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
            inputs=_input_names(endpoint, inputs),
            seq=self._next_seq(),
            created_at=now,
            updated_at=now,
        )
        with _disk_full_is_507():
            await self.store.add(job, inputs)
        await self.queue.put(job, place)
        return job

    def _check_space(self, endpoint: str, params: Params, inputs: dict[str, bytes]) -> None:
        """507 before anything is written when the output disk cannot hold what this job may
        need on top of the space kept free."""
        if "image" in inputs:
            width, height = png_size(inputs["image"])
        else:
            width, height = int(params["width"]), int(params["height"])
        needed = self.settings.min_free_space + job_bytes(total_images(params), width, height)
        free = free_bytes(self.settings.output)
        if free < needed:
            raise ApiError(
                507,
                "disk_full",
                f"the output disk has {format_size(free)} free; this job needs "
                f"{format_size(needed)} ({format_size(self.settings.min_free_space)} kept free "
                "by --min-free-space, plus its images): free some space and try again",
            )

    def _check_room(self, place: Place | None) -> None:
        """429 for a job that needs a place when none could be reserved (a POST of a job that
        exists already needs none, so it is answered even when the queue is full)."""
        if place is None:
            raise ApiError(429, "queue_full", f"{self.queue.full_error()}; try again later")

    async def get(self, endpoint: str, id_: str) -> Job | None:
        return self.store.cached(endpoint, id_) or await self.store.get(endpoint, id_)

    async def cancel(self, job: Job) -> Job:
        """QUEUED → CANCELED at once; a running script is ended. Idempotent."""
        if job.status.finished:
            return job
        if self.queue.remove(job):
            await self.store.settle(job, status=Status.CANCELED, finished_at=time.time(), pid=None)
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
        key = (job.endpoint, job.id)
        if len(job.images) >= job.total_images:
            # Every image was published but the server died before saying COMPLETE.
            await self.store.settle(
                job, status=Status.COMPLETE, pid=None, finished_at=time.time(), error=None
            )
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            runner = JobRunner(self.settings, self.store, job)
            self._running[key] = (runner, done)
            await runner.run()
        except Exception:
            # The exception's text can name server paths: clients get the id it is logged as.
            incident = secrets.token_hex(8)
            log.exception("job %s/%s failed inside the server (%s)", job.endpoint, job.id, incident)
            await self.store.settle(
                job,
                status=Status.FAILED,
                pid=None,
                finished_at=time.time(),
                error=f"internal server error while running the job; it was logged as {incident}",
            )
        finally:
            self._running.pop(key, None)
            done.set_result(None)

    @property
    def running(self) -> int:
        return len(self._running)


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


def _input_names(endpoint: str, inputs: dict[str, bytes]) -> dict[str, str]:
    if endpoint == INPAINT_IMAGE:
        # inpaint.py pairs X_mask.png with X.png in its input folder.
        return {"image": f"{INPAINT_INPUT_NAME}.png", "mask": f"{INPAINT_INPUT_NAME}_mask.png"}
    return {field: f"{field}.png" for field in inputs}
