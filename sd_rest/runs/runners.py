"""The runner seam: how the manager runs a job, whatever runs it.

A runner runs one job once: it reports through a `RunSink` (the job started, progress, an
image is published) and returns an `Outcome`. The manager turns those into state transitions;
a runner never changes a job's state itself. `Runners` picks the implementation the
settings ask for: a resident worker, or one process per job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Protocol

from .jobs import ImageRecord, Job
from .settings import Settings
from .store import JobStore

RESIDENT: Final = "resident"
PROCESS: Final = "process"


class RunSink(Protocol):
    """What a runner tells about the job it runs. `started` and `published` are durable
    (they raise OSError when the disk refuses them: the runner then stops its run)."""

    async def started(self, pid: int | None) -> None: ...

    def progress(self, index: int, fraction: float) -> None: ...

    async def published(self, record: ImageRecord) -> None: ...


class OutcomeKind(Enum):
    COMPLETE = "complete"  # every image is published
    FAILED = "failed"
    CANCELED = "canceled"  # a client asked (DELETE)
    STOPPED = "stopped"  # the server is stopping: the job stays resumable


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    error: str | None = None  # for FAILED

    @classmethod
    def failed(cls, error: str) -> Outcome:
        return cls(OutcomeKind.FAILED, error)


class Runner(Protocol):
    async def run(self) -> Outcome:
        """Run the job once; returns when nothing of the run is left running."""
        ...

    def cancel(self) -> None:
        """A client canceled: end the run now; the outcome is CANCELED (unless it finished)."""
        ...

    def stop(self, grace: float) -> None:
        """The server is stopping: interrupt, kill after `grace` seconds; STOPPED."""
        ...


class Runners:
    """Makes the runner of each job, the way the settings ask (`--runner`): a resident worker
    (resident_runner.py), or one process per job (script_runner.py)."""

    def __init__(self, settings: Settings, store: JobStore) -> None:
        from .worker_pool import WorkerPool

        self.settings = settings
        self.store = store
        self.kind = settings.runner
        self.pool = WorkerPool(settings) if settings.runner == RESIDENT else None

    def __call__(self, job: Job, sink: RunSink) -> Runner:
        if self.pool is not None:
            from .resident_runner import ResidentRunner

            return ResidentRunner(self.settings, self.store, job, sink, self.pool)
        from .script_runner import ScriptRunner

        return ScriptRunner(self.settings, self.store, job, sink)

    def start(self) -> None:
        """At server start, before any job: resident workers warm up."""
        if self.pool is not None:
            self.pool.start()

    async def describe(self) -> list[dict[str, Any]]:
        """The workers' states, for `GET /` (none without resident workers); never waits on
        a worker."""
        return self.pool.describe() if self.pool is not None else []

    async def close(self) -> None:
        """At shutdown, once no job runs any more."""
        from . import pty_process

        if self.pool is not None:
            await self.pool.close()
        await pty_process.closed()


RunnerFactory = Callable[[Job, RunSink], Runner]
