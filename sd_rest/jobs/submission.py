"""Turning a POST into a stored, queued job: whether the endpoint can run at all, the job's id
(a POST of a job that exists answers with it, or retries it when it failed or was canceled),
one submission per id at a time, room in the queue, space on the disk, and its inputs written
before it is queued."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path

from sd_rest.endpoints import ENDPOINTS
from sd_rest.errors import ApiError
from sd_rest.fields import Params
from sd_rest.jobs.queue import JobQueue, Place
from sd_rest.jobs.running import RunningJobs
from sd_rest.settings import Settings
from sd_rest.state import lifecycle
from sd_rest.state.disk import format_size, free_bytes, is_disk_full, job_bytes
from sd_rest.state.jobs import Job, Status, job_id
from sd_rest.state.layout import Key
from sd_rest.state.store import JobStore


class Submitter:
    def __init__(
        self, settings: Settings, store: JobStore, queue: JobQueue, runs: RunningJobs
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.runs = runs  # a job still running is not retried; a closing server takes none
        self._submitting: dict[Key, asyncio.Lock] = {}
        self._last_seq = 0
        # --broker: why jobs cannot be handed to the worker hosts now (None: they can).
        self.broker_unavailable: Callable[[], Awaitable[str | None]] | None = None

    def continue_after(self, jobs: Iterable[Job]) -> None:
        """New jobs are ordered after these (the recovered ones)."""
        for job in jobs:
            self._last_seq = max(self._last_seq, job.seq)

    def _next_seq(self) -> int:
        # Nanoseconds since the epoch, never repeated: orders jobs across restarts too.
        self._last_seq = max(self._last_seq + 1, time.time_ns())
        return self._last_seq

    def check_ready(self, endpoint: str) -> Path:
        """503 when this endpoint's jobs cannot run: say so now, not after a model load.
        Returns the checkpoint's path as configured."""
        if self.runs.closing:
            raise ApiError(503, "shutting_down", "the server is shutting down")
        model = ENDPOINTS[endpoint].model
        checkpoint = self.settings.checkpoint(model)
        if self.settings.broker is not None:
            return checkpoint  # run by the worker hosts: this node needs neither file
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
        self,
        endpoint: str,
        params: Params,
        uploads: dict[str, bytes],
        inputs: dict[str, bytes],
        notes: tuple[str, ...] = (),
    ) -> Job:
        """`uploads`: the bytes the client sent (they make the id); `inputs`: the files the
        script reads; `notes`: what the request asked that the scripts cannot do (job.py)."""
        # Resolved here only (a realpath is a stat per folder): the id names the real file.
        checkpoint = str(self.check_ready(endpoint).resolve())
        digests = {field: hashlib.sha256(data).hexdigest() for field, data in uploads.items()}
        key = (endpoint, job_id(endpoint, params, checkpoint, digests, notes))
        # Before the first await: concurrent submissions must not all see the same free room.
        place = self.queue.reserve()
        lock = self._submitting.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                return await self._submit(key, params, checkpoint, digests, inputs, place, notes)
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
        notes: tuple[str, ...],
    ) -> Job:
        endpoint, id_ = key
        existing = await self.store.get(endpoint, id_)
        if existing is not None:
            if existing.status in (Status.FAILED, Status.CANCELED) and key not in self.runs:
                self._check_room(place)
                self._check_space(endpoint, params, inputs)
                await self._check_broker()
                with _disk_full_is_507():
                    await self.store.restore_inputs(existing, inputs)
                    # Queued anew; images it already has are kept and only the rest are made.
                    await self.store.commit(existing, lifecycle.retry(self._next_seq()))
                await self.queue.put(existing, place)
            return existing
        self._check_room(place)
        self._check_space(endpoint, params, inputs)
        await self._check_broker()
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
            notes=notes,
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

    async def _check_broker(self) -> None:
        """503 before anything is written when the job could not be handed to the worker
        hosts: Redis does not answer (a bounded PING)."""
        if self.broker_unavailable is None:
            return
        reason = await self.broker_unavailable()
        if reason is not None:
            raise ApiError(
                503,
                "broker_unavailable",
                f"the job was not created: {reason}; try again once it is back",
                headers={"Retry-After": "5"},
            )

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
