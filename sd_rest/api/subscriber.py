"""One event-stream client's queue: what waits to be written to it, and when it is dropped.

What a connection starts with (its `retry`, then a snapshot or a replay) is its *opening*: a
list of parts that are, all but a few bytes, shared with the server (the serialised items of
stream_items.py, the frames of the replay buffer). It can be far larger than the client buffer
(a queue of long prompts), so it is never written at once: its handler takes it a chunk at a
time, each only once the connection has taken the one before. The events that follow are the
client's own frames and count against its buffer (`limit`).

A client is dropped (logged once, its connection aborted) when a write of its handler waits
longer than the ping interval for the connection to take it (it stopped reading, whatever is
queued), or when, while such a write waits, its own frames grow past `limit`. What a client
that does not read costs is thus bounded: its connection's buffers, at most `limit` of its own
frames, and references to shared parts, for at most a ping interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final

from sd_rest.state.layout import Key

log = logging.getLogger(__name__)

CHUNK: Final = 4 * 1024  # of an opening, written at a time (each copy of it in the TLS and
# socket buffers of a client that does not read is memory held: 16 KiB cost twice as much)
STREAM_WRITE_BUFFER: Final = 16 * 1024  # asyncio's, above which the handler's writes wait


class Subscriber:
    """One client's stream: what waits to be written to it, and why it should end."""

    def __init__(self, key: Key | None, limit: int) -> None:
        self.key = key  # None: every job's events
        self.limit = limit
        self._opening: deque[bytes] = deque()
        self._offset = 0  # into the first opening part: what of it was taken already
        self._frames: list[bytes] = []
        self._size = 0  # of _frames
        self._wake = asyncio.Event()
        self.finished = False  # the per-job stream's last event is queued
        self.closed = False  # the server is stopping, or the client went away
        self.dropped = False
        self.blocked = False  # its handler waits for the connection to take a write
        self._transport: asyncio.WriteTransport | None = None
        self.on_drop: Callable[[], None] | None = None

    def open_with(self, parts: Iterable[bytes], final: bool = False) -> None:
        """Queue what the connection starts with, ahead of any event (see the module)."""
        self._opening.extend(part for part in parts if part)
        self.finished = self.finished or final
        self._wake.set()

    def push(self, data: bytes, final: bool = False) -> None:
        """Queue an event's frame. Only a client whose writes are blocked can be over the
        limit: a burst (a queue move is one event per waiting job) waits here for the next
        write without counting as a stall."""
        if self.finished or self.closed:
            return
        if self._write_now(data):
            if final:
                self.finished = True
                self._wake.set()
            return
        self._frames.append(data)
        self._size += len(data)
        self.finished = final
        if self.blocked and self._size > self.limit:
            self.drop(f"{self._size} bytes of events waiting for it")
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
        if transport is None or self._opening or self._frames or self.blocked:
            return False
        if transport.is_closing() or transport.get_write_buffer_size() >= STREAM_WRITE_BUFFER:
            return False
        transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        return True

    def take(self) -> bytes:
        """The next write: up to CHUNK bytes of the opening while it lasts, then every frame
        queued (at most about `limit` bytes: past it, a blocked client is dropped)."""
        if self._opening:
            return self._take_opening()
        data = b"".join(self._frames)
        self._frames.clear()
        self._size = 0
        self._wake.clear()
        return data

    def _take_opening(self) -> bytes:
        out: list[bytes] = []
        room = CHUNK
        while self._opening and room > 0:
            part = self._opening[0]
            end = min(len(part), self._offset + room)
            out.append(part[self._offset : end] if self._offset or end < len(part) else part)
            room -= end - self._offset
            if end == len(part):
                self._opening.popleft()
                self._offset = 0
            else:
                self._offset = end
        return b"".join(out)

    @property
    def waiting(self) -> int:
        """Bytes of its own frames queued (the opening's shared parts are not counted)."""
        return self._size

    @property
    def empty(self) -> bool:
        return not (self._opening or self._frames)

    async def wait(self) -> None:
        await self._wake.wait()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    def drop(self, why: str) -> None:
        """End this client's stream at once and say so (once)."""
        if self.dropped:
            return
        log.warning("dropped an event-stream client that stopped reading (%s)", why)
        self.dropped = True
        self._opening.clear()
        self._frames.clear()
        self._size = 0
        self.close()
        if self.on_drop is not None:
            self.on_drop()
