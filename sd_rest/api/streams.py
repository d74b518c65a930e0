"""Server-sent event streams: `GET /<endpoint>/<id>/events` (one job) and `GET /events` (every
job), on aiohttp-sse's EventSourceResponse (headers, chunking); the handler writes a ping
comment after a ping interval with nothing to send.

Every change the store announces (events.py) becomes at most one event, serialised once and
shared by every client: its frame goes into a bounded replay buffer and into each subscribed
client's own queue (subscriber.py), which its handler writes out. What a connection starts with
(a snapshot, or a replay) is written a chunk at a time as the connection takes it, from parts
shared by every client (stream_items.py). A client that does not read is dropped once a write
has waited a ping interval, or once its own queue grows past `Limits.stream_buffer` bytes, so
it never slows the others and holds little memory of its own meanwhile.

What a client sees mirrors what a status GET shows (README, "Event streams"): `queued` with a
position (again at each move, 0 once its run is starting), `started` at the first progress,
`progress`, `image`, and one final `complete`, `failed` or `canceled` with the job's item.
A new connection starts with the job's state (a `snapshot`, or its final event when it has
finished); a reconnection with `Last-Event-ID` gets what it missed from the buffer, or that
state when the buffer no longer holds everything after that id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from sd_rest.api.stream_items import ItemParts, every_job_snapshot, item_parts, job_snapshot
from sd_rest.api.subscriber import STREAM_WRITE_BUFFER, Subscriber
from sd_rest.errors import ApiError
from sd_rest.jobs.manager import JobManager
from sd_rest.state.events import JobEvent
from sd_rest.state.items import dumps, job_item
from sd_rest.state.jobs import Job, Status
from sd_rest.state.layout import Key

log = logging.getLogger(__name__)

RETRY_MS: Final = 2000  # how soon a browser reconnects, sent once per connection
REPLAY_EVENTS: Final = 4096  # events kept for reconnections (every job's)
STREAM_PARAMETERS: Final = ("token", "lastEventId")
FINAL: Final = {"complete": Status.COMPLETE, "failed": Status.FAILED, "canceled": Status.CANCELED}
FINAL_NAMES: Final = {status: name for name, status in FINAL.items()}
# A stream's connection only ever reads its request: it does not need asyncio's 256 KiB TLS
# read buffer (see `_lighten`), nor a send buffer the kernel grows to megabytes for a client
# that stopped reading.
STREAM_READ_BUFFER: Final = 1024
STREAM_SEND_BUFFER: Final = 16 * 1024  # the kernel doubles it
PING: Final = b": ping\r\n\r\n"


def frame(
    event_id: int | None, name: str | None, data: str | None, retry: int | None = None
) -> bytes:
    """One event as text/event-stream, exactly as aiohttp-sse's `send` writes it. `data` is
    one line of JSON (json.dumps never writes a raw line break)."""
    out = []
    if event_id is not None:
        out.append(f"id: {event_id}\r\n")
    if name is not None:
        out.append(f"event: {name}\r\n")
    if data is not None:
        out.append(f"data: {data}\r\n")
    if retry is not None:
        out.append(f"retry: {retry}\r\n")
    out.append("\r\n")
    return "".join(out).encode()


def parse_event_id(text: str | None) -> int | None:
    """A Last-Event-ID as this server writes them (a decimal number); None for anything else
    (the client then gets the current state: it never has to guess)."""
    if text is None:
        return None
    text = text.strip()
    # isascii: str.isdigit also takes digits int() cannot read ("²"), a 500 otherwise.
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        return None
    return int(text)


def _ids(job: Job) -> dict[str, Any]:
    return {"id": job.id, "endpoint": job.endpoint}


def _progress(job: Job) -> dict[str, Any]:
    return job.status_document()["progress"]


def _final_parts(job: Job) -> list[bytes]:
    """A finished job's item, for its final event (not kept: a finished job changes no more)."""
    head, tail = item_parts(job)
    return [head, tail]


@dataclass(frozen=True, slots=True)
class Frame:
    id: int
    key: Key
    data: bytes
    final: bool


class EventHub:
    """Turns the store's change notifications into stream events, keeps the last ones for
    reconnections, and hands each to the clients that want it."""

    def __init__(self, manager: JobManager, client_buffer: int, replay: int = REPLAY_EVENTS):
        self.manager = manager
        self.client_buffer = client_buffer
        self._buffer: deque[Frame] = deque(maxlen=replay)
        self.first_id = manager.events.first_id
        self._covered_from = self.first_id  # every event after an id >= this one is buffered
        self.last_id = self.first_id - 1  # the newest event announced so far
        self._by_job: dict[Key, set[Subscriber]] = {}
        self._everything: set[Subscriber] = set()
        self._loading: set[Key] = set()  # run started, no progress yet: reads QUEUED
        self._items = ItemParts()  # what snapshots are made of
        self.closed = False
        self._unlisten = manager.events.listen(self._on_event)

    # --- events in ---------------------------------------------------------------------

    def translate(self, event: JobEvent) -> tuple[str, dict[str, Any]] | None:
        """The stream event a change is (name, data), or None when clients see no change in
        it. Keeps track of which runs have started but show no progress yet."""
        job, key = event.job, (event.job.endpoint, event.job.id)
        kind = event.kind
        if kind == "moved":
            if job.public_status() is not Status.QUEUED:
                return None
            return "queued", {**_ids(job), "position": event.data}
        if kind == "started":
            self._loading.add(key)
            return None  # still reads QUEUED: its move to position 0 was announced
        if kind == "queued":
            self._loading.discard(key)
            return None  # its position comes with the move that puts it in the queue
        if kind == "progress":
            if key in self._loading:
                self._loading.discard(key)
                return "started", {**_ids(job), "progress": _progress(job)}
            return "progress", {**_ids(job), "progress": _progress(job)}
        if kind == "image":
            record = event.data
            url = f"{job.result_url}/{record.n}.png"
            made = {"number": record.n, "seed": record.seed, "position": record.position}
            return "image", {**_ids(job), "url": url, **made}
        if kind in FINAL:
            self._loading.discard(key)
            return kind, job_item(job)
        return None

    def _on_event(self, event: JobEvent) -> None:
        self.last_id = event.id
        translated = self.translate(event)
        if translated is None:
            return
        name, payload = translated
        key = (event.job.endpoint, event.job.id)
        final = name in FINAL
        item = Frame(event.id, key, frame(event.id, name, dumps(payload)), final)
        if len(self._buffer) == self._buffer.maxlen:
            self._covered_from = self._buffer[0].id
        self._buffer.append(item)
        if final:
            self._items.forget(key)
        for subscriber in list(self._by_job.get(key, ())):
            subscriber.push(item.data, final)
            if final:
                self.leave(subscriber)
        for subscriber in self._everything:
            subscriber.push(item.data)

    # --- clients -----------------------------------------------------------------------

    def covers(self, last_id: int | None) -> bool:
        """Whether every event after `last_id` is still in the buffer."""
        return last_id is not None and self._covered_from <= last_id <= self.last_id

    def open(self, job: Job | None, last_id: int | None) -> Subscriber | None:
        """Subscribe a client, with what it has to get first already queued; None when the
        client has already seen the end of `job` (answer 204: EventSource then stops)."""
        if self.closed:
            raise ApiError(503, "shutting_down", "the server is shutting down")
        key = None if job is None else (job.endpoint, job.id)
        subscriber = Subscriber(key, self.client_buffer)
        opening = [frame(None, None, None, retry=RETRY_MS)]
        final = False
        if last_id is not None and self.covers(last_id):
            missed = [f for f in self._buffer if f.id > last_id and (key is None or f.key == key)]
            if key is not None:  # a job's stream ends with its final event
                end = next((n for n, f in enumerate(missed) if f.final), None)
                final = end is not None
                missed = missed if end is None else missed[: end + 1]
            if job is not None and job.status.finished and not final:
                return None
            opening += [f.data for f in missed]
        elif job is None:
            jobs = self._unfinished()
            self._items.keep_only((unfinished.endpoint, unfinished.id) for unfinished in jobs)
            items = [self._parts(unfinished) for unfinished in jobs]
            opening += every_job_snapshot(self.last_id, items)
        elif job.status.finished:
            opening += job_snapshot(self.last_id, FINAL_NAMES[job.status], _final_parts(job))
            final = True
        else:
            opening += job_snapshot(self.last_id, "snapshot", self._parts(job))
        subscriber.open_with(opening, final)
        if not subscriber.finished:
            if key is None:
                self._everything.add(subscriber)
            else:
                self._by_job.setdefault(key, set()).add(subscriber)
        return subscriber

    def _parts(self, job: Job) -> list[bytes]:
        return self._items.parts(job, self.manager.position(job))

    def _unfinished(self) -> list[Job]:
        """Every unfinished job, running ones first, then in queue order."""
        jobs = self.manager.store.unfinished_jobs()
        return sorted(jobs, key=lambda job: (self.manager.position(job) or 0, job.seq))

    def leave(self, subscriber: Subscriber) -> None:
        if subscriber.key is None:
            self._everything.discard(subscriber)
            return
        subscribers = self._by_job.get(subscriber.key)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self._by_job[subscriber.key]

    @property
    def clients(self) -> int:
        return len(self._everything) + sum(len(s) for s in self._by_job.values())

    async def close(self, _app: web.Application | None = None) -> None:
        """End every stream cleanly (what is queued is still written): the server stops."""
        self.closed = True
        self._unlisten()
        for subscriber in [*self._everything, *(s for ss in self._by_job.values() for s in ss)]:
            subscriber.close()


# --- the handler -----------------------------------------------------------------------------


def last_event_id(request: web.Request) -> int | None:
    """From the `Last-Event-ID` header (what EventSource sends when it reconnects), else from
    `lastEventId` in the query (for a page that opens a new EventSource with a new token)."""
    header = request.headers.get("Last-Event-ID")
    return parse_event_id(header if header is not None else request.query.get("lastEventId"))


def check_stream_query(request: web.Request) -> None:
    for name in request.query:
        if name not in STREAM_PARAMETERS:
            raise ApiError(
                400,
                "unknown_field",
                f"unknown query parameter {name!r}; event streams take "
                f"{', '.join(STREAM_PARAMETERS)}",
                name,
            )


# aiohttp-sse's own pinger would write a ping whenever its interval is up, and one written
# while a long snapshot goes out in pieces would land inside the event: the handler sends the
# pings itself, between frames, and aiohttp-sse's waits this long (a year) before its first.
LIBRARY_PING_INTERVAL: Final = 365 * 24 * 3600.0


def _lighten(request: web.Request) -> None:
    """Make this connection cheap to hold while it streams (it is closed afterwards).

    asyncio (3.11+) gives every TLS connection a 256 KiB read buffer for its whole life: 1,000
    streams would hold 256 MB for requests they never send. Its TLS protocol reads through a
    small buffer instead. These are asyncio's internals (guarded: where they are not there,
    nothing changes). The kernel's and asyncio's send buffers are capped as well, so a client
    that stops reading is noticed (and dropped) after kilobytes, not megabytes."""
    transport = request.transport
    if transport is None:
        return
    transport.set_write_buffer_limits(high=STREAM_WRITE_BUFFER)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER)
    protocol = getattr(transport, "_ssl_protocol", None)
    # Under TLS, the transport above is asyncio's TLS layer: the socket's own transport, below
    # it, would hold 64 KiB of encrypted data for a client that does not read.
    below = getattr(protocol, "_transport", None)
    if isinstance(below, asyncio.WriteTransport):
        below.set_write_buffer_limits(high=STREAM_WRITE_BUFFER)
    if isinstance(getattr(protocol, "_ssl_buffer", None), bytearray):
        protocol.max_size = STREAM_READ_BUFFER
        protocol._ssl_buffer = bytearray(STREAM_READ_BUFFER)
        protocol._ssl_buffer_view = memoryview(protocol._ssl_buffer)


async def stream(request: web.Request, hub: EventHub, job: Job | None) -> web.StreamResponse:
    check_stream_query(request)
    subscriber = hub.open(job, last_event_id(request))
    if subscriber is None:
        return web.Response(status=204)
    response = EventSourceResponse(ping_interval=LIBRARY_PING_INTERVAL)
    # The connection closes after the stream: it was lightened for streaming (`_lighten`),
    # and an EventSource reconnects on a new request anyway.
    response.force_close()
    try:
        await response.prepare(request)
    except BaseException:
        hub.leave(subscriber)
        raise
    transport = request.transport
    subscriber.on_drop = transport.abort if transport is not None else None
    _lighten(request)
    if isinstance(transport, asyncio.WriteTransport):
        subscriber.attach(transport)
    try:
        async with response:
            await _serve(response, subscriber, request.app[STREAM_PING])
    except (ConnectionError, RuntimeError):
        pass  # the client went away (RuntimeError: aiohttp, on writing after the end)
    finally:
        hub.leave(subscriber)
    return response


async def _serve(response: web.StreamResponse, subscriber: Subscriber, ping: float) -> None:
    """Write what is queued for the client, and a ping after `ping` seconds with nothing to
    write, until its stream ends. A write the connection has not taken within `ping` seconds
    drops the client: it is not reading (what a write waits for is the connection's buffer to
    drain below a few KiB)."""
    idle = False
    while True:
        data = subscriber.take() or (PING if idle else b"")
        idle = False
        if data and not subscriber.dropped:
            subscriber.blocked = True
            try:
                await asyncio.wait_for(response.write(data), ping)
            except asyncio.TimeoutError:
                subscriber.drop(f"it took nothing for {ping:g} s")
            finally:
                subscriber.blocked = False
            continue
        if subscriber.finished or subscriber.closed:
            return
        try:
            await asyncio.wait_for(subscriber.wait(), ping)
        except asyncio.TimeoutError:
            idle = True


HUB: Final = web.AppKey("event_hub", EventHub)
STREAM_PING: Final = web.AppKey("stream_ping", float)
