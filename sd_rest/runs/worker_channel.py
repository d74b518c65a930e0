"""A resident worker's control channel, the server's side: a Unix socket in a private folder
that the worker connects to, its "ready" with our token, then JSON lines both ways (the protocol
is in worker_driver/__init__.py). Every line the worker sends proves it alive; its heartbeats
also say what it holds, for `GET /`."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

SOCKET_ENV: Final = "SD_REST_WORKER_SOCKET"
TOKEN_ENV: Final = "SD_REST_WORKER_TOKEN"
HEARTBEAT_ENV: Final = "SD_REST_WORKER_HEARTBEAT"
READY_TIMEOUT: Final = 60.0  # the driver connects before importing anything heavy
# The longest line read from a worker: its errors are capped at 2,000 characters and its
# heartbeats are small, so only a broken driver comes near it (asyncio's default is 64 KiB).
LINE_LIMIT: Final = 1 << 20


class NotReady(Exception):
    """The worker did not connect and say "ready" with our token."""


class Rendezvous:
    """Where a worker about to start will connect: listened on before it is spawned."""

    def __init__(self) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="sd-rest-worker-"))  # 0700: ours alone
        self._path = self._folder / "control.sock"
        self._token = secrets.token_hex(16)
        self._listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listening.bind(str(self._path))
            self._listening.listen(1)
            self._listening.setblocking(False)
        except OSError:
            self.close()
            raise

    def environment(self, heartbeat: float) -> dict[str, str]:
        return {
            SOCKET_ENV: str(self._path),
            TOKEN_ENV: self._token,
            HEARTBEAT_ENV: f"{heartbeat:g}",
        }

    async def meet(
        self, exited: asyncio.Future[Any]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]]:
        """The worker's connection and its "ready"; NotReady if it ends first, or does not
        connect and say it in time, or says it without our token."""
        try:
            connection = await asyncio.wait_for(self._accept(exited), READY_TIMEOUT)
            reader, writer = await asyncio.open_connection(sock=connection, limit=LINE_LIMIT)
            ready = json.loads(await asyncio.wait_for(reader.readline(), READY_TIMEOUT))
        except (asyncio.TimeoutError, OSError, ValueError) as exc:
            raise NotReady(f"the worker did not start: {exc or type(exc).__name__}") from exc
        if (
            not isinstance(ready, dict)
            or ready.get("event") != "ready"
            or not (secrets.compare_digest(str(ready.get("token")), self._token))
        ):
            writer.close()
            raise NotReady("the worker's first message was not its ready with our token")
        return reader, writer, ready

    async def _accept(self, exited: asyncio.Future[Any]) -> socket.socket:
        loop = asyncio.get_running_loop()
        accepting = loop.create_task(loop.sock_accept(self._listening))
        done, _ = await asyncio.wait({accepting, exited}, return_when=asyncio.FIRST_COMPLETED)
        if accepting not in done:
            accepting.cancel()
            raise OSError(f"it exited first ({exited.result().describe()})")
        connection, _ = accepting.result()
        return connection

    def close(self) -> None:
        self._listening.close()
        shutil.rmtree(self._folder, ignore_errors=True)


class Channel:
    """The connected channel: sends requests, reads the worker's lines until EOF."""

    def __init__(
        self,
        number: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_message: Callable[[dict[str, Any]], None],
    ) -> None:
        self.number = number
        self.last_heard = time.monotonic()  # the last line from the worker
        self.longest_silence = 0.0  # between two of its lines
        self.heartbeat: dict[str, Any] = {}  # the last one
        self._reader = reader
        self._writer = writer
        self._on_message = on_message

    def silence(self) -> float:
        return time.monotonic() - self.last_heard

    def send(self, message: dict[str, Any]) -> None:
        if self._writer.is_closing():
            raise OSError("the worker's channel is closed")
        self._writer.write(json.dumps(message).encode() + b"\n")

    async def read(self) -> None:
        """Until EOF: the worker is gone (its pty says how it ended)."""
        while True:
            try:
                line = await self._reader.readline()
            except OSError:
                line = b""
            except ValueError:  # a line over LINE_LIMIT: the worker broke the protocol
                log.error("worker %d sent a line over %d bytes: ending it", self.number, LINE_LIMIT)
                self.close()  # the worker leaves at its channel's end: its run dies at once
                return
            if not line:
                return
            now = time.monotonic()
            self.longest_silence = max(self.longest_silence, now - self.last_heard)
            self.last_heard = now
            try:
                message = json.loads(line)
            except ValueError:
                log.warning("worker %d sent a bad line: %r", self.number, line[:200])
                continue
            if isinstance(message, dict):
                if message.get("event") == "heartbeat":
                    self.heartbeat = message
                self._on_message(message)

    def close(self) -> None:
        self._writer.close()
