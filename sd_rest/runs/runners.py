"""Which runner runs a job: `Runners` makes each job's runner the way the settings ask
(`--runner`), a resident worker or one process per job, behind the seam of `seam.py`."""

from __future__ import annotations

from typing import Any

from sd_rest.runs import pty_process
from sd_rest.runs.resident_runner import ResidentRunner
from sd_rest.runs.script_runner import ScriptRunner
from sd_rest.runs.seam import RESIDENT, Runner, RunSink
from sd_rest.runs.worker_pool import WorkerPool
from sd_rest.settings import Settings
from sd_rest.state.jobs import Job
from sd_rest.state.store import JobStore


class Runners:
    """Makes the runner of each job, the way the settings ask (`--runner`): a resident worker
    (resident_runner.py), or one process per job (script_runner.py)."""

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.pool = WorkerPool(settings) if settings.runner == RESIDENT else None

    def __call__(self, job: Job, sink: RunSink) -> Runner:
        if self.pool is not None:
            return ResidentRunner(self.settings, self.store, job, sink, self.pool)
        return ScriptRunner(self.settings, self.store, job, sink)

    def start(self) -> None:
        """At server start, before any job: resident workers warm up."""
        if self.pool is not None:
            self.pool.start()

    def describe(self) -> list[dict[str, Any]]:
        """The workers' states, for `GET /` (none without resident workers); never waits on
        a worker."""
        return self.pool.describe() if self.pool is not None else []

    async def close(self) -> None:
        """At shutdown, once no job runs any more."""
        if self.pool is not None:
            await self.pool.close()
        await pty_process.closed()
