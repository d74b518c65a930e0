"""Server-sent event streams: `GET /<endpoint>/<id>/events` (one job) and `GET /events` (every
job), on aiohttp-sse's EventSourceResponse (headers, chunking, a comment every 15 s).

Every change the store announces (events.py) becomes at most one event, serialised once and
shared by every client: its frame goes into a bounded replay buffer and into each subscribed
client's own queue, which its handler writes out (all it has in one write). A client that does
not read fills its queue; past `Limits.stream_buffer` bytes it is dropped, so it never slows
the others or holds more memory than that.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .errors import ApiError
from .events import JobEvent
from .jobs import Job, Status
from .layout import Key
from .listing import dumps, job_item
from .manager import JobManager

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
STREAM_WRITE_BUFFER: Final = 16 * 1024  # asyncio's, above which the handler's writes wait


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


@dataclass(frozen=True, slots=True)
class Frame:
    id: int
    key: Key
    data: bytes
    final: bool


class Subscriber:
    """One client's stream: what waits to be written to it, and why it should end."""

    def __init__(self, key: Key | None, limit: int) -> None:
        self.key = key  # None: every job's events
        self.limit = limit
        self._frames: list[bytes] = []
        self._size = 0
        self._wake = asyncio.Event()
        self.finished = False  # the per-job stream's last event is queued
        self.closed = False  # the server is stopping, or the client went away
        self.dropped = False
        self.blocked = False  # its handler waits for the connection to take a write
        self._transport: asyncio.WriteTransport | None = None
        self.on_drop: Callable[[], None] | None = None

    def push(self, data: bytes, final: bool = False, bounded: bool = True) -> None:
        """Queue `data`. `bounded`: counted against the limit (what a connection starts with,
        a snapshot or a replay, is not: the client has not had a chance to read yet). Only a
        client whose writes are blocked can be over it: a burst (a queue move is one event per
        waiting job) waits here for the next write without counting as a stall."""
        if self.finished or self.closed:
            return
        if bounded and self._write_now(data):
            if final:
                self.finished = True
                self._wake.set()
            return
        self._frames.append(data)
        if bounded:
            self._size += len(data)
        self.finished = final
        if self.blocked and self._size > self.limit:
            self.drop()
        else:
            self._wake.set()

    def attach(self, transport: asyncio.WriteTransport) -> None:
        """The connection, once the response has started: see `_write_now`."""
        self._transport = transport

    def _write_now(self, data: bytes) -> bool:
        """Write `data` as the next chunk of the response at once, when the client keeps up
        (nothing queued, its handler not waiting on a write, the connection's buffer low).
        With 1,000 clients, waking 1,000 handlers for each event costs as much CPU again as
        the writes themselves; the frame is the same chunk aiohttp's writer would send."""
        transport = self._transport
        if transport is None or self._frames or self.blocked or transport.is_closing():
            return False
        if transport.get_write_buffer_size() >= STREAM_WRITE_BUFFER:
            return False
        transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        return True

    def take(self) -> bytes:
        data = b"".join(self._frames)
        self._frames.clear()
        self._size = 0
        self._wake.clear()
        return data

    @property
    def waiting(self) -> int:
        return self._size

    async def wait(self) -> None:
        await self._wake.wait()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    def drop(self) -> None:
        log.warning(
            "dropped an event-stream client that stopped reading (%d bytes waiting for it)",
            self._size,
        )
        self.dropped = True
        self._frames.clear()
        self._size = 0
        self.close()
        if self.on_drop is not None:
            self.on_drop()


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
        for subscriber in list(self._by_job.get(key, ())):
            subscriber.push(item.data, final)
            if final:
                self._leave(subscriber)
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
        subscriber.push(frame(None, None, None, retry=RETRY_MS), bounded=False)
        if last_id is not None and self.covers(last_id):
            missed = [f for f in self._buffer if f.id > last_id and (key is None or f.key == key)]
            if job is not None and job.status.finished and not any(f.final for f in missed):
                return None
            for item in missed:
                subscriber.push(item.data, item.final and key is not None, bounded=False)
        elif job is None:
            jobs = [self._item(unfinished) for unfinished in self._unfinished()]
            snapshot = frame(self.last_id, "snapshot", dumps({"jobs": jobs}))
            subscriber.push(snapshot, bounded=False)
        elif job.status.finished:
            name = FINAL_NAMES[job.status]
            last = frame(self.last_id, name, dumps(job_item(job)))
            subscriber.push(last, final=True, bounded=False)
        else:
            snapshot = frame(self.last_id, "snapshot", dumps(self._item(job)))
            subscriber.push(snapshot, bounded=False)
        if not subscriber.finished:
            if key is None:
                self._everything.add(subscriber)
            else:
                self._by_job.setdefault(key, set()).add(subscriber)
        return subscriber

    def _item(self, job: Job) -> dict[str, Any]:
        return job_item(job, self.manager.position(job))

    def _unfinished(self) -> list[Job]:
        """Every unfinished job, running ones first, then in queue order."""
        jobs = self.manager.store.unfinished_jobs()
        return sorted(jobs, key=lambda job: (self.manager.position(job) or 0, job.seq))

    def _leave(self, subscriber: Subscriber) -> None:
        if subscriber.key is None:
            self._everything.discard(subscriber)
            return
        subscribers = self._by_job.get(subscriber.key)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self._by_job[subscriber.key]

    def leave(self, subscriber: Subscriber) -> None:
        self._leave(subscriber)

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


def _event_source(ping: float) -> EventSourceResponse:
    try:
        return EventSourceResponse(ping_interval=ping)  # type: ignore[call-arg, unused-ignore]
    except TypeError:  # aiohttp-sse < 3 (Python 3.10) has it as a property
        response = EventSourceResponse()
        response.ping_interval = ping  # type: ignore[attr-defined, unused-ignore]
        return response


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
    if isinstance(getattr(protocol, "_ssl_buffer", None), bytearray):
        protocol.max_size = STREAM_READ_BUFFER
        protocol._ssl_buffer = bytearray(STREAM_READ_BUFFER)
        protocol._ssl_buffer_view = memoryview(protocol._ssl_buffer)


async def stream(request: web.Request, hub: EventHub, job: Job | None) -> web.StreamResponse:
    check_stream_query(request)
    subscriber = hub.open(job, last_event_id(request))
    if subscriber is None:
        return web.Response(status=204)
    response = _event_source(request.app[STREAM_PING])
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
    # aiohttp-sse's pinger ends when a write fails: the client has gone.
    pinger = asyncio.ensure_future(response.wait())
    pinger.add_done_callback(lambda _: subscriber.close())
    try:
        async with response:
            while True:
                data = subscriber.take()
                if data and not subscriber.dropped:
                    subscriber.blocked = True
                    try:
                        await response.write(data)
                    finally:
                        subscriber.blocked = False
                if subscriber.finished or subscriber.closed:
                    break
                await subscriber.wait()
    except (ConnectionError, RuntimeError):
        pass  # the client went away (RuntimeError: aiohttp, on writing after the end)
    finally:
        hub.leave(subscriber)
        pinger.cancel()
    return response


HUB: Final = web.AppKey("event_hub", EventHub)
STREAM_PING: Final = web.AppKey("stream_ping", float)
