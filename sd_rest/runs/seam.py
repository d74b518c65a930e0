"""The runner seam: how the manager runs a job, whatever runs it.

A runner runs one job once: it reports through a `RunSink` (the job started, progress, an
image is published) and returns an `Outcome`. The manager turns those into state transitions;
a runner never changes a job's state itself. Every runner imports this module; `runners.py`
picks the implementation the settings ask for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final, Protocol, runtime_checkable

from sd_rest.state.jobs import ImageRecord, Job, RemoteWorker

RESIDENT: Final = "resident"


class RunSink(Protocol):
    """What a runner tells about the job it runs. `started` and `published` are durable
    (they raise OSError when the disk refuses them: the runner then stops its run)."""

    async def started(self, pid: int | None, worker: RemoteWorker | None = None) -> None:
        """`pid`: the local script's process; `worker`: the remote worker host's attempt
        (--broker). A job already started by an earlier attempt goes back to the queue and
        starts again (the images kept so far stay)."""
        ...

    async def requeued(self) -> None:
        """A remote run was handed back (its worker host is stopping): the job waits in the
        queue again for the next delivery."""
        ...

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


RunnerFactory = Callable[[Job, RunSink], Runner]


@runtime_checkable
class Concluding(Protocol):
    """A runner with something to do once its job's outcome is durable (the remote runner
    deletes the job's keys in Redis only then: an API node dying before reads the end
    again)."""

    async def concluded(self) -> None: ...
