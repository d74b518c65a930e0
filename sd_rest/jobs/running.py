"""The jobs being run: a queue worker's run of one job, the runner's reports turned into the
job's lifecycle transitions, its outcome settled, and the ends of a run asked for by a cancel
or a shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable

from sd_rest.runs.seam import Concluding, Outcome, OutcomeKind, Runner, RunnerFactory
from sd_rest.state import lifecycle
from sd_rest.state.jobs import ImageRecord, Job, RemoteWorker, Status
from sd_rest.state.layout import Key
from sd_rest.state.store import JobStore

log = logging.getLogger(__name__)

CANCEL_WAIT = 2.0  # seconds a DELETE waits for a running job to end


class _JobSink:
    """What a runner reports, turned into the job's transitions (see runners.RunSink)."""

    def __init__(self, store: JobStore, job: Job, moved: Callable[[Job, bool], None]) -> None:
        self.store = store
        self.job = job
        self._moved = moved  # (job, started): it left the queue's waiting jobs, or rejoined

    async def started(self, pid: int | None, worker: RemoteWorker | None = None) -> None:
        if self.job.status is Status.IN_PROGRESS:  # a new attempt of a remote job
            await self.store.commit(self.job, lifecycle.requeue())
        await self.store.commit(self.job, lifecycle.start(self.job, pid, time.time(), worker))
        self.job.set_waiting(None)
        self._moved(self.job, True)

    async def requeued(self) -> None:
        if self.job.status is Status.IN_PROGRESS:
            await self.store.commit(self.job, lifecycle.requeue())
        self._moved(self.job, False)

    def progress(self, index: int, fraction: float) -> None:
        if self.job.set_progress(index, fraction):
            self.store.events.emit(self.job, "progress", self.job.progress)

    async def published(self, record: ImageRecord) -> None:
        await self.store.commit(self.job, lifecycle.publish(self.job, record))


class RunningJobs:
    """`run` is the queue's worker body; each job it runs is held here, with the future its
    cancel waits on, until its outcome is settled."""

    def __init__(self, store: JobStore, runners: RunnerFactory) -> None:
        self.store = store
        self.runners = runners
        # Told when a run starts (True) or is handed back to wait again (False): the queue
        # counts remote jobs as waiting until a worker host starts them.
        self.on_moved: Callable[[Job, bool], None] = lambda job, started: None
        self._running: dict[Key, tuple[Runner, asyncio.Future[None], Job]] = {}
        # Set by a shutdown: a job a worker takes after it stays QUEUED for the next start.
        self.closing = False

    def __len__(self) -> int:
        return len(self._running)

    def __contains__(self, key: Key) -> bool:
        return key in self._running

    def snapshot(self) -> list[Job]:
        """Every job with a run now, in the order the runs began: IN_PROGRESS, or still QUEUED
        while its run starts (with --broker: until a worker host starts it)."""
        return [job for _, _, job in self._running.values()]

    async def run(self, job: Job) -> None:
        if job.status.finished or self.closing:
            return  # canceled while waiting; or left QUEUED for the next start
        if len(job.images) >= job.total_images:
            await self.store.settle(job, lifecycle.complete(time.time()))  # nothing left to make
            return
        key = (job.endpoint, job.id)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            runner = self.runners(job, _JobSink(self.store, job, self.on_moved))
            self._running[key] = (runner, done, job)
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
        if outcome.kind is not OutcomeKind.STOPPED and isinstance(runner, Concluding):
            await self._after(job, runner)

    async def _after(self, job: Job, runner: Concluding) -> None:
        try:
            await runner.concluded()
        except Exception:
            log.exception("job %s/%s: after its outcome", job.endpoint, job.id)

    def started(self) -> int:
        """How many of the jobs run here have started (a remote one may still wait)."""
        return sum(1 for _, _, job in self._running.values() if job.status is Status.IN_PROGRESS)

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

    async def cancel(self, job: Job) -> None:
        """Ends `job`'s run, if it has one, and waits (a while) for its outcome to be settled."""
        running = self._running.get((job.endpoint, job.id))
        if running is None:
            return
        runner, done, _ = running
        runner.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(done), CANCEL_WAIT)
        except asyncio.TimeoutError:
            log.warning("job %s did not end within %.1f s of its cancel", job.id, CANCEL_WAIT)

    def stop(self, grace: float) -> None:
        """Interrupts every run (killed after `grace` seconds): its job is left resumable."""
        for runner, _, _ in list(self._running.values()):
            runner.stop(grace)
