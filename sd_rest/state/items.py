"""A job as the listing shows it, and as the index keeps it: its item (the status document
and what describes the job), the place it sorts at, the index's row, and the index's failures.
Below the index (index.py) and the listing's pages (jobs/listing.py), which both use them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sd_rest.state.jobs import Job, Status

# (createdAt, endpoint, id): a job's place in the listing, the last one shown in a cursor.
Place = tuple[float, str, str]


def iso_time(seconds: float | None) -> str | None:
    """UTC, ISO 8601 with milliseconds and a `Z`: what JavaScript's `new Date()` reads."""
    if seconds is None:
        return None
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_item(job: Job, position: int | None = None) -> dict[str, Any]:
    """A job as the listing (and the event stream's snapshots and final events) show it: its
    status document, plus what identifies and describes it."""
    return {**item_head(job, position), **item_tail(job)}


def item_head(job: Job, position: int | None = None) -> dict[str, Any]:
    """An item's first half: what identifies the job, and its status document (`position`
    last, when the job waits)."""
    return {"id": job.id, "endpoint": job.endpoint, **job.status_document(position)}


def item_tail(job: Job) -> dict[str, Any]:
    """An item's second half: its times and parameters (stream_items.py shares it)."""
    return {
        "createdAt": iso_time(job.created_at),
        "startedAt": iso_time(job.started_at),
        "finishedAt": iso_time(job.finished_at),
        "params": job.params,
    }


def dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


class IndexClosed(Exception):
    """The index was closed: the server is stopping."""


class IndexUnavailable(Exception):
    """The index could not be read nor made again (logged): worth asking again later."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Row:
    """One job as the index holds it: the item JSON as of its last change."""

    created: float
    endpoint: str
    id: str
    status: Status
    item: str

    @property
    def place(self) -> Place:
        return (self.created, self.endpoint, self.id)
