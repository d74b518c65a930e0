"""A job: what was asked, where it stands, and the JSON a client sees."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from sd_rest.endpoints import ENDPOINTS
from sd_rest.fields import Params

SIDECAR_VERSION = 1


class Status(str, Enum):
    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETE = "COMPLETE"
    FAILED = "FAILED"
    CANCELED = "CANCELED"

    @property
    def finished(self) -> bool:
        return self in (Status.COMPLETE, Status.FAILED, Status.CANCELED)


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """Image `<n>.png`, made by a run seeded `seed`, as that run's `position`-th image."""

    n: int
    seed: int
    position: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "seed": self.seed, "position": self.position, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageRecord:
        return cls(int(data["n"]), int(data["seed"]), int(data["position"]), str(data["sha256"]))


@dataclass(frozen=True, slots=True)
class RemoteWorker:
    """The worker host running a job's current attempt (with `--broker`): kept in the sidecar
    so that a restarted API node knows which attempt's reports count (cluster.md)."""

    host: str
    pid: int  # the worker host's `worker` process: never a process of this machine
    attempt: str
    # The worker's own id (its registry record's): hosts in containers share pid 1, so
    # host and pid do not tell two hosts apart. None in sidecars written before it was kept.
    id: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"host": self.host, "pid": self.pid, "attempt": self.attempt}
        if self.id is not None:
            doc["id"] = self.id
        return doc

    @classmethod
    def from_json(cls, data: Any) -> RemoteWorker | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            raise TypeError("worker is not an object")
        pid = data["pid"]
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TypeError(f"worker pid {pid!r} is not a number")
        worker_id = data.get("id")
        return cls(
            str(data["host"]), pid, str(data["attempt"]),
            None if worker_id is None else str(worker_id),
        )  # fmt: skip


def job_id(
    endpoint: str,
    params: Params,
    checkpoint: str,
    uploads: dict[str, str],
    notes: tuple[str, ...] = (),
) -> str:
    """32 hex chars, equal for equal requests: normalised params, checkpoint, upload bytes,
    and the notes of what the request asked that the scripts cannot do (only when there are
    some: every other job keeps the id it always had)."""
    doc: dict[str, Any] = {
        "endpoint": endpoint,
        "params": params,
        "checkpoint": checkpoint,
        "uploads": uploads,
    }
    if notes:
        doc["notes"] = list(notes)
    key = json.dumps(
        doc,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(eq=False, slots=True)
class Job:
    id: str
    endpoint: str
    params: Params
    checkpoint: str
    uploads: dict[str, str]  # field -> sha256 of the bytes the client sent
    inputs: dict[str, str]  # field -> file name inside the job folder
    seq: int  # submission order; a re-queued job gets a new one
    status: Status = Status.QUEUED
    images: tuple[ImageRecord, ...] = ()
    error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0  # script runs started for this job
    pid: int | None = None  # the running script, so a restarted server can end an orphan
    # What the request asked that the scripts cannot do (AUTOMATIC1111's dialect: a negative
    # prompt, another sampler...): named in each image's infotext, never dropped silently.
    notes: tuple[str, ...] = ()
    worker: RemoteWorker | None = None  # the remote worker host running it (--broker)

    # Runtime only, never persisted.
    progress: tuple[int, float] | None = field(default=None, repr=False)
    version: int = field(default=0, repr=False)  # bumped by every change a client can see
    _status_body: bytes | None = field(default=None, repr=False)
    _body_position: int | None = field(default=None, repr=False)  # what _status_body shows
    _lock: asyncio.Lock | None = field(default=None, repr=False)
    # Why a remote job waits: no live worker holds its checkpoint (--broker).
    waiting: str | None = field(default=None, repr=False)

    @property
    def total_images(self) -> int:
        return ENDPOINTS[self.endpoint].total_images(self.params)

    @property
    def result_url(self) -> str:
        return f"/{self.endpoint}/{self.id}"

    @property
    def lock(self) -> asyncio.Lock:
        # Created lazily: thousands of finished jobs never need one.
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def image(self, n: int) -> ImageRecord | None:
        return self.images[n - 1] if 1 <= n <= len(self.images) else None

    def invalidate(self) -> None:
        self._status_body = None

    def set_waiting(self, reason: str | None) -> bool:
        """Say (or stop saying) why the job waits; returns whether it changed."""
        if reason == self.waiting:
            return False
        self.waiting = reason
        self._status_body = None
        return True

    def set_progress(self, index: int, fraction: float) -> bool:
        """Move progress forward only; returns whether it changed."""
        candidate = (min(max(index, 1), self.total_images), min(max(fraction, 0.0), 1.0))
        if self.progress is not None and candidate <= self.progress:
            return False
        self.progress = candidate
        self._status_body = None
        return True

    # --- what clients see -------------------------------------------------------------

    def public_status(self) -> Status:
        # Like the original: a job whose script is still loading its model reads QUEUED, until
        # the run's first progress; a resumed job too, whatever images it already has.
        if self.status is Status.IN_PROGRESS and self.progress is None:
            return Status.QUEUED
        return self.status

    def status_document(self, position: int | None = None) -> dict[str, Any]:
        """`position`: where the job stands in the queue, shown while it reads QUEUED."""
        status = self.public_status()
        doc: dict[str, Any] = {"status": status.value, "resultUrl": self.result_url}
        if status is Status.IN_PROGRESS and self.progress is not None:  # always, then
            index, fraction = self.progress
            doc["progress"] = {
                "currentImageIndex": index,
                "currentImageProgress": round(fraction, 4),
                "totalImages": self.total_images,
            }
        urls = [f"{self.result_url}/{image.n}.png" for image in self.images]
        doc["imageUrls"] = urls
        # Each image's run seed and place in that run: how to make it again (README, "Seeds").
        doc["images"] = [
            {"url": url, "seed": image.seed, "position": image.position}
            for url, image in zip(urls, self.images, strict=True)
        ]
        if status is Status.FAILED:
            doc["error"] = self.error or "the script failed"
        if status is Status.QUEUED and position is not None:
            doc["position"] = position
        if self.status is Status.IN_PROGRESS and self.worker is not None:
            doc["worker"] = {"host": self.worker.host, "pid": self.worker.pid}
        elif status is Status.QUEUED and self.waiting is not None:
            doc["waiting"] = self.waiting
        return doc

    def status_body(self, position: int | None = None) -> bytes:
        """The status JSON, serialised once per change: status GETs are the hot path."""
        if self._status_body is None or position != self._body_position:
            doc = self.status_document(position)
            self._status_body = json.dumps(doc, separators=(",", ":")).encode()
            self._body_position = position
        return self._status_body

    # --- the sidecar ------------------------------------------------------------------

    def to_sidecar(self) -> dict[str, Any]:
        return {
            "version": SIDECAR_VERSION,
            "id": self.id,
            "endpoint": self.endpoint,
            "params": self.params,
            "checkpoint": self.checkpoint,
            "uploads": self.uploads,
            "inputs": self.inputs,
            "seq": self.seq,
            "status": self.status.value,
            "totalImages": self.total_images,
            "images": [image.to_json() for image in self.images],
            "error": self.error,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "attempts": self.attempts,
            "pid": self.pid,
            **({"notes": list(self.notes)} if self.notes else {}),
            **({"worker": self.worker.to_json()} if self.worker is not None else {}),
        }

    @classmethod
    def from_sidecar(cls, data: dict[str, Any]) -> Job:
        """Raises KeyError/ValueError/TypeError on a sidecar that is not ours or is damaged."""
        if not isinstance(data, dict):
            raise TypeError(f"the sidecar is a JSON {type(data).__name__}, not an object")
        if data.get("version") != SIDECAR_VERSION:
            raise ValueError(f"unknown sidecar version {data.get('version')!r}")
        if not isinstance(data["images"], list):
            raise TypeError("images is not a list")
        images = tuple(ImageRecord.from_json(item) for item in data["images"])
        if [image.n for image in images] != list(range(1, len(images) + 1)):
            raise ValueError("images are not numbered 1..N")
        params = data["params"]
        if not isinstance(params, dict):
            raise TypeError("params is not an object")
        # A lone surrogate (a "\ud800" escape) reads as JSON but is no UTF-8: the job's status
        # and listing item could never be written out (UnicodeEncodeError is a ValueError).
        json.dumps(data, ensure_ascii=False).encode()
        # What serving and resuming compute from params must not fail later, on a request.
        total = ENDPOINTS[data["endpoint"]].total_images(params)
        if total < 1 or len(images) > total:
            raise ValueError("images do not fit iterations × batchSize")
        int(params["seed"])
        pid = data["pid"]
        if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool)):
            raise TypeError(f"pid {pid!r} is not a process id")
        return cls(
            id=str(data["id"]),
            endpoint=sys.intern(str(data["endpoint"])),
            params=_interned_keys(params),
            checkpoint=sys.intern(str(data["checkpoint"])),
            uploads=_interned_keys(data["uploads"]),
            inputs={sys.intern(k): sys.intern(v) for k, v in dict(data["inputs"]).items()},
            seq=int(data["seq"]),
            status=Status(data["status"]),
            images=images,
            error=data["error"],
            created_at=float(_sidecar_time(data, "createdAt")),
            updated_at=float(data["updatedAt"]),
            started_at=_sidecar_time(data, "startedAt", optional=True),
            finished_at=_sidecar_time(data, "finishedAt", optional=True),
            attempts=int(data["attempts"]),
            pid=pid,
            notes=tuple(str(note) for note in data.get("notes", ())),
            # Sidecars from before the cluster have none.
            worker=RemoteWorker.from_json(data.get("worker")),
        )


def _interned_keys(mapping: dict[str, Any]) -> dict[str, Any]:
    # Thousands of jobs stay in memory: share the few distinct key strings between them
    # (json.loads makes new ones for every sidecar it reads).
    return {sys.intern(key): value for key, value in dict(mapping).items()}


def _sidecar_time(data: dict[str, Any], name: str, optional: bool = False) -> Any:
    """The time `name` of a sidecar, in seconds since the epoch: a number a date can be made
    of, as the listing shows it (items.iso_time), or None where `optional`. Checked here so
    that a sidecar holding another (a string, infinity, a year past 9999) is corrupt, and
    quarantined, instead of failing every time its job is listed or its row made."""
    value = data[name]
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} {value!r} is not a number of seconds")
    try:
        datetime.fromtimestamp(value, timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"{name} {value!r} is no time a date can show") from None
    return value
