"""GET /jobs: what a listing item is, how its query is read and its cursor made (pure), and
the page itself, read from the index (index.py) with unfinished jobs taken from memory.

Order: newest first by creation (`createdAt`, then endpoint and id to break ties). A job keeps
its place for good, even when it is posted again after a failure, so a cursor (the place of
the last item shown) never skips or repeats an item however many jobs arrive meanwhile: new
ones come before the first page.

A cursor is signed (HMAC-SHA256 under the key of cursorkey.py): one this server did not make is
refused before any of it is read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sd_rest.endpoints import ENDPOINTS
from sd_rest.errors import ApiError, invalid
from sd_rest.jobs.manager import JobManager
from sd_rest.state.items import (
    IndexClosed,
    IndexUnavailable,
    Place,
    Row,
    dumps,
    job_item,
)
from sd_rest.state.jobs import Status
from sd_rest.state.layout import ID_RE

DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 500
SIGNATURE_BYTES: Final = 16  # of the HMAC-SHA256 that ends a cursor
MAX_CURSOR_LENGTH: Final = 600  # far more than a place takes
PARAMETERS: Final = ("status", "endpoint", "limit", "cursor")

# The filter's names for the public statuses (what the items' `status` says).
STATUS_NAMES: Final = {
    "queued": Status.QUEUED,
    "running": Status.IN_PROGRESS,
    "complete": Status.COMPLETE,
    "failed": Status.FAILED,
    "canceled": Status.CANCELED,
}
UNFINISHED: Final = frozenset({Status.QUEUED, Status.IN_PROGRESS})


@dataclass(frozen=True)
class ListQuery:
    statuses: frozenset[Status]  # public statuses wanted; all when no filter
    endpoints: frozenset[str]
    limit: int = DEFAULT_LIMIT
    after: Place | None = None  # from the cursor

    def stored_statuses(self) -> frozenset[Status]:
        """The statuses to ask the index for: a job that reads QUEUED may be IN_PROGRESS on
        disk (its script is loading), so `queued` asks for both."""
        wanted = set(self.statuses)
        if Status.QUEUED in wanted:
            wanted.add(Status.IN_PROGRESS)
        return frozenset(wanted)


# --- the query -----------------------------------------------------------------------------


def parse_query(query: Mapping[str, str] | Iterable[tuple[str, str]], key: bytes) -> ListQuery:
    """The listing's query parameters, or a 400 naming the one at fault. `status` and
    `endpoint` take several values, comma-separated or repeated; `key` checks the cursor."""
    pairs = list(query.items()) if isinstance(query, Mapping) else list(query)
    values: dict[str, list[str]] = {}
    for name, value in pairs:
        if name not in PARAMETERS:
            raise ApiError(
                400,
                "unknown_field",
                f"unknown query parameter {name!r}; GET /jobs takes {', '.join(PARAMETERS)}",
                name,
            )
        values.setdefault(name, []).append(value)
    for name in ("limit", "cursor"):
        if len(values.get(name, [])) > 1:
            raise ApiError(400, "duplicate_field", f"{name} is given more than once", name)
    statuses = _choices(values.get("status", []), "status", STATUS_NAMES)
    endpoints = _choices(values.get("endpoint", []), "endpoint", {e: e for e in ENDPOINTS})
    limit = _limit(values["limit"][0]) if "limit" in values else DEFAULT_LIMIT
    after = decode_cursor(values["cursor"][0], key) if "cursor" in values else None
    return ListQuery(
        statuses=frozenset(statuses) or frozenset(Status),
        endpoints=frozenset(endpoints) or frozenset(ENDPOINTS),
        limit=limit,
        after=after,
    )


def _choices(given: list[str], name: str, allowed: Mapping[str, Any]) -> list[Any]:
    chosen = []
    for text in given:
        for word in text.split(","):
            key = word.strip()
            if key.lower() in allowed and name == "status":
                key = key.lower()
            if key not in allowed:
                raise invalid(name, f"{name} {word.strip()!r} is not one of {', '.join(allowed)}")
            chosen.append(allowed[key])
    return chosen


def _limit(text: str) -> int:
    message = f"limit must be a whole number from 1 to {MAX_LIMIT}"
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()):  # "²" is a digit int() cannot read
        raise invalid("limit", message)
    digits = digits.lstrip("0") or "0"  # int() refuses over 4,300 digits, zeros included
    if len(digits) > len(str(MAX_LIMIT)):
        raise invalid("limit", message)
    limit = int(digits)
    if not 1 <= limit <= MAX_LIMIT:
        raise invalid("limit", message)
    return limit


def encode_cursor(place: Place, key: bytes) -> str:
    """Opaque to clients: the place of the last item shown (the float exactly, as hex)."""
    created, endpoint, job_id = place
    raw = json.dumps([float(created).hex(), endpoint, job_id], separators=(",", ":"))
    return seal(raw.encode(), key)


def seal(raw: bytes, key: bytes) -> str:
    """`raw` and its signature, as unpadded URL-safe base64."""
    signature = hmac.new(key, raw, hashlib.sha256).digest()[:SIGNATURE_BYTES]
    return base64.urlsafe_b64encode(raw + signature).decode().rstrip("=")


def decode_cursor(text: str, key: bytes) -> Place:
    bad = invalid("cursor", "cursor is not one this server gave out (use nextCursor as it is)")
    if len(text) > MAX_CURSOR_LENGTH:
        raise bad
    try:
        sealed = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, binascii.Error):
        raise bad from None
    raw, signature = sealed[:-SIGNATURE_BYTES], sealed[-SIGNATURE_BYTES:]
    expected = hmac.new(key, raw, hashlib.sha256).digest()[:SIGNATURE_BYTES]
    if len(sealed) <= SIGNATURE_BYTES or not hmac.compare_digest(signature, expected):
        raise bad
    # Signed by this server, so made by encode_cursor: checked all the same (a key leaked or
    # an older format must still not reach a 500).
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise bad from None
    if not (isinstance(doc, list) and len(doc) == 3 and all(isinstance(v, str) for v in doc)):
        raise bad
    created_hex, endpoint, job_id = doc
    try:
        created = float.fromhex(created_hex)
    except ValueError:
        raise bad from None
    if not (math.isfinite(created) and endpoint in ENDPOINTS and ID_RE.fullmatch(job_id)):
        raise bad
    return created, endpoint, job_id


# --- the page ------------------------------------------------------------------------------


def page_body(items: Sequence[str], next_place: Place | None, key: bytes) -> bytes:
    cursor = None if next_place is None else encode_cursor(next_place, key)
    return ('{"items":[' + ",".join(items) + '],"nextCursor":' + json.dumps(cursor) + "}").encode()


async def list_jobs(manager: JobManager, query: ListQuery, key: bytes) -> bytes:
    """The page `query` asks for, as the response body (its cursor signed with `key`).
    Unfinished jobs are always in memory: their items come from there (live progress,
    current position); finished ones are the index's JSON as it is."""
    index = manager.store.index
    stored = query.stored_statuses()
    items: list[tuple[Place, str]] = []
    after = query.after
    while len(items) <= query.limit:
        want = query.limit + 1 - len(items)
        try:
            rows = await index.page(stored, query.endpoints, after, want)
        except IndexClosed:
            raise ApiError(503, "shutting_down", "the server is shutting down") from None
        except IndexUnavailable as exc:
            raise ApiError(
                503,
                "index_unavailable",
                f"the job listing cannot be read now ({exc}); try again shortly",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        for row in rows:
            text = _item_text(manager, row, query.statuses)
            if text is not None:
                items.append((row.place, text))
        if len(rows) < want:
            break
        after = rows[-1].place
    shown = items[: query.limit]
    more = len(items) > query.limit
    return page_body([text for _, text in shown], shown[-1][0] if more and shown else None, key)


def _item_text(manager: JobManager, row: Row, statuses: frozenset[Status]) -> str | None:
    job = manager.store.unfinished(row.endpoint, row.id) if row.status in UNFINISHED else None
    if job is None:
        return row.item if row.status in statuses else None
    if job.public_status() not in statuses:
        return None
    return dumps(job_item(job, manager.position(job)))
