"""The entries a worker host adds to a job's stream, and what the API node reads back: pure
encoding, no Redis. Redis hands fields back as bytes; every entry names its attempt, and the
API node takes an entry only from the job's current attempt.

- started: the attempt began on `worker` (host, pid, id); `delivery` counts the deliveries;
- progress: the job-wide image index and the fraction of it done;
- image: image `n` of the job, its PNG bytes, the run seed and position that made it;
- end: `outcome` complete | failed | canceled | stopped (the worker host is stopping: the job
  goes back to the queue), the error for failed, and the tail of the script's log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final, Literal

STARTED: Final = "started"
PROGRESS: Final = "progress"
IMAGE: Final = "image"
END: Final = "end"

Outcome = Literal["complete", "failed", "canceled", "stopped"]
OUTCOMES: Final = ("complete", "failed", "canceled", "stopped")
LOG_TAIL_BYTES: Final = 4000


class BadEntry(ValueError):
    """An entry that is not one of ours, or is damaged: it is skipped, and logged."""


@dataclass(frozen=True)
class WorkerRef:
    host: str
    pid: int
    worker_id: str

    def to_json(self) -> dict[str, object]:
        return {"host": self.host, "pid": self.pid, "id": self.worker_id}

    @classmethod
    def from_json(cls, data: object) -> WorkerRef:
        if not isinstance(data, dict):
            raise BadEntry("worker is not an object")
        try:
            return cls(str(data["host"]), int(data["pid"]), str(data["id"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadEntry(f"worker: {exc}") from None


@dataclass(frozen=True)
class Started:
    attempt: str
    worker: WorkerRef
    delivery: int


@dataclass(frozen=True)
class Progress:
    attempt: str
    index: int
    fraction: float


@dataclass(frozen=True)
class Image:
    attempt: str
    n: int
    seed: int
    position: int
    png: bytes


@dataclass(frozen=True)
class End:
    attempt: str
    outcome: Outcome
    error: str | None
    log_tail: str


Entry = Started | Progress | Image | End
Fields = dict[str, str | bytes | int | float]


def started(attempt: str, worker: WorkerRef, delivery: int) -> Fields:
    return {
        "kind": STARTED,
        "attempt": attempt,
        "worker": json.dumps(worker.to_json()),
        "delivery": delivery,
    }


def progress(attempt: str, index: int, fraction: float) -> Fields:
    return {"kind": PROGRESS, "attempt": attempt, "index": index, "fraction": repr(fraction)}


def image(attempt: str, n: int, seed: int, position: int, png: bytes) -> Fields:
    return {
        "kind": IMAGE,
        "attempt": attempt,
        "n": n,
        "seed": seed,
        "position": position,
        "png": png,
    }


def end(attempt: str, outcome: Outcome, error: str | None, log_tail: bytes) -> Fields:
    fields: Fields = {
        "kind": END,
        "attempt": attempt,
        "outcome": outcome,
        "log": log_tail[-LOG_TAIL_BYTES:],
    }
    if error is not None:
        fields["error"] = error
    return fields


def decode(raw: dict[bytes, bytes]) -> Entry:
    """An entry as Redis returns it (bytes keys and values); BadEntry when it is not ours."""
    fields = {key.decode("utf-8", "replace"): value for key, value in raw.items()}
    try:
        kind = _text(fields, "kind")
        attempt = _text(fields, "attempt")
        if kind == STARTED:
            worker = WorkerRef.from_json(json.loads(fields["worker"]))
            return Started(attempt, worker, int(fields["delivery"]))
        if kind == PROGRESS:
            return Progress(attempt, int(fields["index"]), float(fields["fraction"]))
        if kind == IMAGE:
            n, seed, position = (int(fields[name]) for name in ("n", "seed", "position"))
            return Image(attempt, n, seed, position, bytes(fields["png"]))
        if kind == END:
            outcome = _text(fields, "outcome")
            if outcome not in OUTCOMES:
                raise BadEntry(f"unknown outcome {outcome!r}")
            error = _text(fields, "error") if "error" in fields else None
            tail = bytes(fields.get("log", b"")).decode("utf-8", "replace")
            return End(attempt, outcome, error, tail)  # type: ignore[arg-type]
    except (KeyError, ValueError, TypeError) as exc:
        if isinstance(exc, BadEntry):
            raise
        raise BadEntry(f"a damaged entry: {exc!r}") from None
    raise BadEntry(f"unknown kind {kind!r}")


def _text(fields: dict[str, bytes], name: str) -> str:
    return bytes(fields[name]).decode("utf-8")
