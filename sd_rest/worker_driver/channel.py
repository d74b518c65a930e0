"""The control channel: JSON objects, one per line, on a Unix socket the server listens on."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any, Dict, Iterator

Message = Dict[str, Any]

# Characters of an error text a message carries: the server reads a line of at most 1 MiB, and
# the full text (a script's exception message may be huge) is in the job's log anyway.
MAX_ERROR = 2000


def capped(text: str | None) -> str | None:
    """`text`, cut to MAX_ERROR characters, saying so."""
    if text is None or len(text) <= MAX_ERROR:
        return text
    return f"{text[:MAX_ERROR]}... [{len(text) - MAX_ERROR} more characters in the job's log]"


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()  # the main thread and the reader thread both send

    @classmethod
    def connect(cls, path: str) -> Channel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    def send(self, message: Message) -> None:
        data = (json.dumps(message) + "\n").encode()
        with self._send_lock:
            self._sock.sendall(data)

    def lines(self) -> Iterator[bytes]:
        """Each non-empty line received, until EOF (the server closed its end, or died)."""
        pending = b""
        while True:
            chunk = self._sock.recv(65536)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.strip():
                    yield line
