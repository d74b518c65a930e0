"""The second runner: the job's unmodified script run as `__main__` in a resident worker
(workers.py, worker_pool.py), which keeps the imports and the model loaded between jobs."""

from __future__ import annotations

import asyncio
import logging
import signal

from sd_rest.endpoints import ENDPOINTS
from sd_rest.runs.exits import ScriptExit
from sd_rest.runs.job_run import JobRun
from sd_rest.runs.progress import ProgressParser
from sd_rest.runs.publisher import ImagePublisher
from sd_rest.runs.seam import Outcome, OutcomeKind, RunSink
from sd_rest.runs.worker_pool import WorkerPool
from sd_rest.runs.workers import Finished, Worker, WorkerError
from sd_rest.runs.workspace import Workspace
from sd_rest.scripts import plan_run
from sd_rest.settings import Settings
from sd_rest.state.jobs import Job
from sd_rest.state.store import JobStore

log = logging.getLogger(__name__)

# A worker not idle again this long after an interrupt is killed, and a fresh one started.
WORKER_KILL_AFTER = 1.0


class ResidentRunner(JobRun):
    def __init__(
        self, settings: Settings, store: JobStore, job: Job, sink: RunSink, pool: WorkerPool
    ) -> None:
        super().__init__(settings, store, job, sink)
        self.pool = pool
        self._worker: Worker | None = None
        self._script_began = False  # the worker has begun the script: an interrupt reaches it
        self._reported_start = False
        self._retry: str | None = None  # why the run deserves a second chance, in a fresh worker
        self._abandon = asyncio.Event()  # set: stop waiting for a worker warming up

    async def run(self) -> Outcome:
        outcome = await super().run()
        if outcome.kind is OutcomeKind.FAILED and self._retry and not self._interrupted:
            log.warning(
                "job %s/%s: %s; running it once more in a fresh worker",
                self.job.endpoint,
                self.job.id,
                self._retry,
            )
            # A second run, resumed by the usual rules: the images made so far are kept.
            self._retry = None
            self.plan = plan_run(self.job.params, self.job.total_images, len(self.job.images))
            self.parser = ProgressParser()
            outcome = await super().run()
            self._retry = None
        return outcome

    @property
    def _interrupted(self) -> bool:
        return self._canceled or self._stopping or self._fault is not None

    def _end(self, first: signal.Signals, kill_after: float) -> None:
        # Whatever the signal asked of a script, a worker gets an interrupt: SIGINT becomes a
        # KeyboardInterrupt in the script and leaves the worker serving; SIGTERM would end it.
        # An idle worker ignores one, so before the script begins it waits for `_began`.
        worker = self._worker
        if worker is None:
            self._abandon.set()
            return  # no worker yet: the run is not begun when it comes (see _execute)
        if self._script_began:
            worker.interrupt()
        self._kill_later(max(kill_after, WORKER_KILL_AFTER), worker.end_now)

    def _began(self) -> None:
        self._script_began = True
        if self._worker is not None and (self._canceled or self._stopping or self._fault):
            self._worker.interrupt()

    async def _started(self, pid: int | None) -> None:
        if self._reported_start:  # a second run of the same job: it has started already
            self._end_as_asked()
            return
        self._reported_start = True
        await super()._started(pid)

    async def _execute(self, workspace: Workspace, publisher: ImagePublisher) -> ScriptExit | str:
        endpoint = ENDPOINTS[self.job.endpoint]
        try:
            worker = await self.pool.acquire(self._abandon)
        except WorkerError as exc:
            workspace.log.write(f"could not start a worker: {exc}\n".encode())
            return str(exc)
        if worker is None or self._canceled or self._stopping:  # asked while it was found
            if worker is not None:
                self.pool.release(worker)
            return ScriptExit(None, signal.SIGINT)
        self._worker = worker
        self._script_began = False
        try:
            await self._started(worker.pid)
            finished = await worker.run(
                self.job.id,
                self.settings.repository / endpoint.script,
                workspace.argv[2:],  # after the interpreter and the script
                workspace.folders.cwd,
                endpoint.start_seed(self.plan),
                lambda data: self._output(data, workspace, publisher),
                self._began,
            )
        finally:
            self._worker = None
            self.pool.release(worker)
        self._retry = _second_chance(finished)
        if finished.silent is not None:
            message = _silent_message(finished.silent, self.settings.worker_timeout)
            workspace.log.write(f"\nsd-rest: {message}\n".encode())
            return message
        return finished.ended


def _silent_message(silent: float, limit: float) -> str:
    return (
        f"the worker running the script sent no heartbeat for {silent:.0f} s (hung, or "
        f"stopped; --worker-timeout {limit:g}): it was killed"
    )


def _second_chance(finished: Finished) -> str | None:
    """Why a failed run should be tried once more in a fresh worker: the worker ran out of
    memory, died under it (the system kills a process that runs out), or hung."""
    if finished.oom:
        return "the worker ran out of memory"
    if finished.silent is not None:
        return f"its worker was silent for {finished.silent:.0f} s and was killed"
    if finished.died is not None:
        return f"its worker died ({finished.died.describe()})"
    return None
