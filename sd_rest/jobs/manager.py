"""Submitting, finding, canceling and running jobs: the layer between the routes and the
store, queue and runners. It owns the decisions (which transition, when); the store makes
them durable and visible, runners run. `JobManager` is the face the routes, the server and the
CLI use: it starts and stops the rest, and hands submissions to `Submitter` (submission.py) and
runs to `RunningJobs` (running.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sd_rest.fields import Params
from sd_rest.jobs.queue import JobQueue
from sd_rest.jobs.recovery import Recovery
from sd_rest.jobs.running import RunningJobs
from sd_rest.jobs.submission import Submitter
from sd_rest.runs import pty_process
from sd_rest.runs.provenance import provenance_for
from sd_rest.runs.runners import Runners
from sd_rest.runs.seam import RunnerFactory
from sd_rest.settings import Settings
from sd_rest.state import lifecycle
from sd_rest.state.events import JobEvents
from sd_rest.state.jobs import Job, Status
from sd_rest.state.layout import Layout
from sd_rest.state.store import JobStore

log = logging.getLogger(__name__)


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
        self.runs = RunningJobs(self.store, self.runners)
        # With --broker every queued job is handed to its remote run at once: the worker
        # hosts' own --concurrency bounds the work.
        remote = self.runners.remote if isinstance(self.runners, Runners) else None
        concurrency = None if settings.broker is not None else settings.concurrency
        self.queue = JobQueue(concurrency, settings.max_queue, self.runs.run)
        self.queue.on_moved = self._moved
        self.runs.on_moved = self._run_moved
        self.submitter = Submitter(settings, self.store, self.queue, self.runs)
        if remote is not None:
            self.submitter.broker_unavailable = remote.unavailable
        self.remote = remote
        self._stop_sweep = threading.Event()
        self._sweeper: asyncio.Future[None] | None = None
        # The checkpoints' digests and the fork's commit, for the images' metadata.
        self.provenance = provenance_for(settings.output, settings.repository)

    # --- start and stop ---------------------------------------------------------------

    def recover(self) -> list[Job]:
        """Before serving: the unfinished jobs on disk, ready to run again in order."""
        unfinished = self.recovery.recover()
        self.submitter.continue_after(unfinished)
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
        self.runs.closing = True
        self.queue.stop_taking()

    async def shutdown(self) -> None:
        """Stop taking jobs, interrupt running ones (killed after the grace period) and leave
        them resumable: they are queued again on disk, for the next start."""
        self.stop_taking()
        self._stop_sweep.set()
        self.provenance.close()
        self.runs.stop(self.settings.shutdown_grace)
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

    def _run_moved(self, job: Job, started: bool) -> None:
        if started:
            self.queue.taken(job)
        else:
            self.queue.rejoined(job)

    def position(self, job: Job) -> int | None:
        """Where a job that reads QUEUED stands (1 = next, 0 = its run is starting); None for
        any other job."""
        if job.public_status() is not Status.QUEUED:
            return None
        return self.queue.position(job)

    # --- requests ---------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """Shutting down: POSTs get 503 and no waiting job is started."""
        return self.runs.closing

    def check_ready(self, endpoint: str) -> Path:
        """503 when this endpoint's jobs cannot run; else the checkpoint's path as configured."""
        return self.submitter.check_ready(endpoint)

    async def submit(
        self,
        endpoint: str,
        params: Params,
        uploads: dict[str, bytes],
        inputs: dict[str, bytes],
        notes: tuple[str, ...] = (),
    ) -> Job:
        """`uploads`: the bytes the client sent (they make the id); `inputs`: the files the
        script reads; `notes`: what the request asked that the scripts cannot do."""
        return await self.submitter.submit(endpoint, params, uploads, inputs, notes)

    async def get(self, endpoint: str, id_: str) -> Job | None:
        return self.store.cached(endpoint, id_) or await self.store.get(endpoint, id_)

    async def cancel(self, job: Job) -> Job:
        """QUEUED → CANCELED at once; a running job is ended. Idempotent."""
        if job.status.finished:
            return job
        if (job.endpoint, job.id) in self.runs:  # a remote run is begun while it waits
            await self.runs.cancel(job)
            return job
        if self.queue.remove(job):
            await self.store.settle(job, lifecycle.cancel(time.time()))
            return job
        await self.runs.cancel(job)
        return job

    @property
    def running(self) -> int:
        # A remote run is begun at once; its job runs once a worker host has started it.
        return self.runs.started() if self.remote is not None else len(self.runs)

    def workers(self) -> list[dict[str, Any]]:
        """Each resident worker's state (idle or busy, model, jobs served, RSS), or each live
        worker host's (--broker): from what the server knows, never waiting on a worker or
        on Redis."""
        if self.remote is not None:
            return self.remote.workers()
        return self.runners.describe() if isinstance(self.runners, Runners) else []

    def unserved(self) -> dict[str, str] | None:
        """--broker: the endpoints no live worker host can serve, and why (else None)."""
        return self.remote.unserved() if self.remote is not None else None
