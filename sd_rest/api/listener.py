"""Accepting connections: a bound on how many are open, and memory given back after them.

The server accepts TCP connections itself rather than through `loop.create_server`, so that
a connection beyond `--max-connections` is closed at once, before any TLS work or buffer is
spent on it; the others get their TLS through asyncio's public `connect_accepted_socket` and
then belong to aiohttp as usual.

Memory: asyncio gives every TLS connection a 256 KiB buffer, and a connection that ends during
its handshake (a client that connects and goes away, garbage on the port) leaves a reference
cycle that only a full garbage collection frees; meanwhile the C library keeps the freed heap.
Measured: 5 rounds of 300 such connections took a server from 45 MB to 440 MB for good. So,
after connections have come and gone, the listener runs a full collection and asks glibc to
return free heap pages (`malloc_trim`, where it exists: Linux with glibc; macOS's allocator
returns freed pages by itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Final

from sd_rest.settings import DEFAULT_MAX_CONNECTIONS

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT: Final = 60.0
RECLAIM_EVERY: Final = 2.0  # seconds between checks for connections that came and went
BACKLOG: Final = 1024


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, passed every event, so that the listener knows
    exactly when the connection is gone (`release` runs once, however it ends)."""

    def __init__(self, inner: asyncio.Protocol, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._inner.connection_lost(exc)
        finally:
            self.release()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class Slots:
    """The connections open at once, at most `limit`: one count for every listener of a
    server (--max-connections bounds the server, whatever port a connection came in by)."""

    def __init__(self, limit: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.limit = limit
        self.open = 0  # from accept until the connection is gone

    def take(self) -> bool:
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def give_back(self) -> None:
        self.open -= 1


class Listener:
    """Listens on `host`:`port`, hands TLS connections to `factory` (aiohttp's server), and
    keeps at most `max_connections` open (in their handshake or serving), or as many as the
    `slots` it shares with other listeners allow. Without a `context` the connections are
    plain HTTP (--http-port)."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext | None,
        host: str,
        port: int,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        slots: Slots | None = None,
    ) -> None:
        self._factory = factory
        self._context = context
        self.host, self.port = host, port
        self.slots = slots if slots is not None else Slots(max_connections)
        self.refused = 0
        self.accepted = 0
        self._handshaking: set[asyncio.Task[None]] = set()
        self._sockets: list[socket.socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._comings_and_goings = 0  # accepts and ends: memory to reclaim when it moves
        self._reclaimed_at = 0
        self._trim = _malloc_trim()

    async def start(self) -> None:
        """Bind every address `host` names (as asyncio's create_server does); OSError when
        the port is taken."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(BACKLOG)
                sock.setblocking(False)
        except OSError:
            self._close_sockets()
            raise
        self._tasks = [loop.create_task(self._accept(sock)) for sock in self._sockets]
        self._tasks.append(loop.create_task(self._reclaim_memory()))

    @property
    def open(self) -> int:
        """Connections open now, those of the listeners sharing the slots included."""
        return self.slots.open

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every listening socket: the port chosen when `port` was 0."""
        return [sock.getsockname()[:2] for sock in self._sockets]

    async def stop(self) -> None:
        """Stop listening and drop connections still in their handshake; the ones aiohttp
        serves are its to close (runner.cleanup)."""
        for task in [*self._tasks, *self._handshaking]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._handshaking, return_exceptions=True)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listening)
            except OSError as exc:  # e.g. EMFILE: wait for descriptors to come back
                log.warning("accepting a connection failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            self.accepted += 1
            self._comings_and_goings += 1
            if not self.slots.take():
                self.refused += 1
                # Closed before any TLS: the client sees the connection end at once.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                continue
            task = loop.create_task(self._handshake(conn))
            self._handshaking.add(task)
            task.add_done_callback(self._handshaking.discard)

    def _closed(self) -> None:
        self.slots.give_back()
        self._comings_and_goings += 1

    async def _handshake(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        counted = _Counted(self._factory(), self._closed)
        try:
            timeout = HANDSHAKE_TIMEOUT if self._context is not None else None
            await loop.connect_accepted_socket(
                lambda: counted, conn, ssl=self._context, ssl_handshake_timeout=timeout
            )
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            # Scanners, plain HTTP on the TLS port, clients that give up: routine.
            log.debug("TLS handshake failed: %s", exc)
            conn.close()
            counted.release()
        except asyncio.CancelledError:
            conn.close()
            counted.release()
            raise

    async def _reclaim_memory(self) -> None:
        while True:
            await asyncio.sleep(RECLAIM_EVERY)
            # Closes count as well as accepts: the memory is only free once they are gone, which
            # may be after the last accept has been seen.
            if self._comings_and_goings != self._reclaimed_at:
                self._reclaimed_at = self._comings_and_goings
                self.reclaim()

    def reclaim(self) -> None:
        """Free the cycles closed connections left, then give free heap back to the system."""
        gc.collect()
        if self._trim is not None:
            with contextlib.suppress(OSError):
                self._trim(0)
