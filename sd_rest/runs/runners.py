"""Which runner runs a job: `Runners` makes each job's runner the way the settings ask
(`--runner`), a resident worker or one process per job, or (`--broker`) the worker hosts of
the cluster, behind the seam of `seam.py`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sd_rest.runs import pty_process
from sd_rest.runs.resident_runner import ResidentRunner
from sd_rest.runs.script_runner import ScriptRunner
from sd_rest.runs.seam import RESIDENT, Runner, RunSink
from sd_rest.runs.worker_pool import WorkerPool
from sd_rest.settings import Settings
from sd_rest.state.jobs import Job
from sd_rest.state.store import JobStore

if TYPE_CHECKING:
    from sd_rest.runs.remote_jobs import RemoteJobs


class Runners:
    """Makes the runner of each job, the way the settings ask (`--runner`): a resident worker
    (resident_runner.py), or one process per job (script_runner.py); with `--broker`, a
    remote run on the worker hosts (remote_runner.py)."""

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.remote: RemoteJobs | None = None
        if settings.broker is not None:
            # Only here: redis and dramatiq (the cluster extra) are not needed without it.
            from sd_rest.runs.remote_jobs import RemoteJobs

            self.remote = RemoteJobs(settings, store)
        local = settings.runner == RESIDENT and self.remote is None
        self.pool = WorkerPool(settings) if local else None

    def __call__(self, job: Job, sink: RunSink) -> Runner:
        if self.remote is not None:
            from sd_rest.runs.remote_runner import RemoteRunner

            return RemoteRunner(self.remote, self.store, job, sink)
        if self.pool is not None:
            return ResidentRunner(self.settings, self.store, job, sink, self.pool)
        return ScriptRunner(self.settings, self.store, job, sink)

    def start(self) -> None:
        """At server start, before any job: resident workers warm up."""
        if self.pool is not None:
            self.pool.start()
        if self.remote is not None:
            self.remote.start()

    def describe(self) -> list[dict[str, Any]]:
        """The workers' states, for `GET /` (none without resident workers); never waits on
        a worker."""
        return self.pool.describe() if self.pool is not None else []

    async def close(self) -> None:
        """At shutdown, once no job runs any more."""
        if self.pool is not None:
            await self.pool.close()
        if self.remote is not None:
            await self.remote.close()
        await pty_process.closed()
