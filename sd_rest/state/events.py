"""Change notifications: every change a client can see (a transition, a progress step) bumps
the job's version and wakes whoever waits for the job's next change, and every listener gets
the event as it happens (the event stream and long-polling build on this)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sd_rest.state.jobs import Job

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class JobEvent:
    """`kind`: queued, started, progress, image, complete, failed or canceled (the state
    machine's event names, and progress), or moved (its place in the queue changed: `data` is
    the new position, 0 once a worker took it). `id` increases across all jobs, and across
    restarts: it starts from the clock (microseconds), so that an id a client kept from an
    earlier run of the server is never taken for one of this run's."""

    id: int
    kind: str
    job: Job
    data: Any = None


Listener = Callable[[JobEvent], None]


class JobEvents:
    def __init__(self, first_id: int | None = None) -> None:
        self.first_id = time.time_ns() // 1000 if first_id is None else first_id
        self._ids = itertools.count(self.first_id)
        self._waiters: dict[Key, list[asyncio.Future[None]]] = {}
        self._listeners: list[Listener] = []

    def emit(self, job: Job, kind: str, data: Any = None) -> JobEvent:
        """Called after the change is visible (and durable, for transitions)."""
        job.version += 1
        event = JobEvent(next(self._ids), kind, job, data)
        for waiter in self._waiters.pop((job.endpoint, job.id), ()):
            if not waiter.done():
                waiter.set_result(None)
        for listener in list(self._listeners):
            listener(event)
        return event

    async def changed(self, job: Job, version: int, timeout: float) -> bool:
        """Wait until `job` is past `version` (at once if it is already); False on timeout."""
        if job.version > version:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault((job.endpoint, job.id), [])
        waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)
            if not waiters and self._waiters.get((job.endpoint, job.id)) is waiters:
                del self._waiters[(job.endpoint, job.id)]
        return True

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with every event from now on; returns what stops it. A listener must
        not block: it runs inside the change that emitted the event."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)
