"""The job state machine: every change of a job's state is one of these transitions, checked
here and nowhere else. The store makes each one durable before it is visible.

    (new) --submit--> QUEUED --start--> IN_PROGRESS --complete--> COMPLETE
                        |                 |   ^  \\--fail-------> FAILED ----\\
                        |                 |   |   \\-cancel-----> CANCELED --+-retry--> QUEUED
                        |                 |   publish (an image)
                        |                 \\--requeue (shutdown, crash)--> QUEUED
                        \\--cancel--> CANCELED,  --fail--> FAILED (the run could not start),
                           --complete--> COMPLETE (every image was already there)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sd_rest.state.jobs import ImageRecord, Job, RemoteWorker, Status

_RUNNABLE = frozenset({Status.QUEUED, Status.IN_PROGRESS})


class Transition(Enum):
    """(what a client may see happen, the states it leaves from, the state it reaches)"""

    START = ("started", frozenset({Status.QUEUED}), Status.IN_PROGRESS)
    PUBLISH = ("image", frozenset({Status.IN_PROGRESS}), Status.IN_PROGRESS)
    COMPLETE = ("complete", _RUNNABLE, Status.COMPLETE)
    FAIL = ("failed", _RUNNABLE, Status.FAILED)
    CANCEL = ("canceled", _RUNNABLE, Status.CANCELED)
    REQUEUE = ("queued", frozenset({Status.QUEUED, Status.IN_PROGRESS}), Status.QUEUED)
    RETRY = ("queued", frozenset({Status.FAILED, Status.CANCELED}), Status.QUEUED)

    def __init__(self, event: str, sources: frozenset[Status], target: Status) -> None:
        self.event = event
        self.sources = sources
        self.target = target


class IllegalTransition(Exception):
    """A change the state machine does not have: a bug in the caller, never a client's fault."""


@dataclass(frozen=True)
class Change:
    """One transition with the fields it sets."""

    transition: Transition
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> Status:
        return self.transition.target


def check(job: Job, change: Change) -> None:
    """Raise IllegalTransition unless `change` may happen to `job` now."""
    transition = change.transition
    if job.status not in transition.sources:
        raise IllegalTransition(
            f"job {job.endpoint}/{job.id}: cannot {transition.name.lower()} "
            f"a {job.status.value} job"
        )
    if transition is Transition.COMPLETE and len(job.images) < job.total_images:
        raise IllegalTransition(
            f"job {job.endpoint}/{job.id}: complete with {len(job.images)} of "
            f"{job.total_images} images"
        )
    if transition is Transition.PUBLISH:
        record = change.fields["images"][-1]
        if len(change.fields["images"]) != len(job.images) + 1 or record.n != len(job.images) + 1:
            raise IllegalTransition(f"job {job.endpoint}/{job.id}: image {record.n} out of order")


def applied(job: Job, change: Change, now: float | None = None) -> Job:
    """The job as it is after `change` (a copy; `job` is untouched). Checks it first."""
    check(job, change)
    draft = copy.copy(job)
    for name, value in change.fields.items():
        setattr(draft, name, value)
    draft.status = change.target
    draft.updated_at = time.time() if now is None else now
    return draft


# --- the transitions, with what each one sets --------------------------------------------


def start(job: Job, pid: int | None, now: float, worker: RemoteWorker | None = None) -> Change:
    """`pid`: the local script's process; `worker`: the remote worker host's attempt instead
    (--broker; its pid is no process of this machine, so never in `pid`)."""
    fields = {
        "pid": pid,
        "worker": worker,
        "attempts": job.attempts + 1,
        "started_at": now,
        "error": None,
        "progress": None,  # this run's progress is yet to come (memory only)
    }
    return Change(Transition.START, fields)


def publish(job: Job, record: ImageRecord) -> Change:
    return Change(Transition.PUBLISH, {"images": (*job.images, record)})


def complete(now: float) -> Change:
    return Change(
        Transition.COMPLETE, {"pid": None, "worker": None, "finished_at": now, "error": None}
    )


def fail(error: str, now: float) -> Change:
    return Change(
        Transition.FAIL, {"pid": None, "worker": None, "finished_at": now, "error": error}
    )


def cancel(now: float) -> Change:
    return Change(Transition.CANCEL, {"pid": None, "worker": None, "finished_at": now})


def requeue(images: tuple[ImageRecord, ...] | None = None) -> Change:
    """Back to the queue, resumable: the server stopped, or died, while it ran. `images`: the
    ones still on disk, when some went missing. A remote job keeps its `worker`: the attempt
    whose reports a restarted API node still takes."""
    fields: dict[str, Any] = {"pid": None}
    if images is not None:
        fields["images"] = images
    return Change(Transition.REQUEUE, fields)


def retry(seq: int) -> Change:
    """Posted again after it failed or was canceled: queued anew, keeping its images."""
    return Change(
        Transition.RETRY, {"seq": seq, "error": None, "finished_at": None, "worker": None}
    )
