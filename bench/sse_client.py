"""Many event-stream clients in one process, so that reading them does not share a core with
the process that drives the benchmark.

    python -m bench.sse_client PORT PATH CLIENTS [FINALS]

Opens CLIENTS HTTPS connections to PATH (an event stream), prints `{"connected": n}` once each
has its first event, then reads until each stream ends (a job's stream) or, for `/events`,
until FINALS final events have arrived. Then prints one JSON line: client 0's events in full
with their receive times (`time.time()`, the clock of the simulator's event log), and for every
client a digest of what it got: how many events, whether their ids increased, and a hash of
the (id, event, data) sequence (a snapshot's id aside), so that "every client got every event
in order" is a comparison of 1,000 short records.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import sys
import time
from typing import Any

FINAL = ("complete", "failed", "canceled")


class Stream:
    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.events: list[dict[str, Any]] = []
        self.count = 0
        self.increasing = True
        self.last = -1
        self.finals = 0
        self.digest = hashlib.sha256()
        self.first = asyncio.get_running_loop().create_future()

    def add(self, fields: dict[str, str], data: str) -> None:
        number = int(fields.get("id", "-1"))
        self.increasing &= number > self.last
        self.last = number
        self.count += 1
        name = fields.get("event", "message")
        self.finals += name in FINAL
        # A snapshot's id is the newest event when the client connected: clients that
        # connected at different times may differ there, and nowhere else.
        shown = "-" if name == "snapshot" else number
        self.digest.update(f"{shown}\n{name}\n{data}\n".encode())
        if self.keep:
            self.events.append({"recv": time.time(), "id": number, "event": name, "data": data})
        if not self.first.done():
            self.first.set_result(None)


async def read_stream(port: int, path: str, stream: Stream, finals: int) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # our own throwaway certificate on loopback
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"{path}: {head[:200]!r}")
    fields: dict[str, str] = {}
    data: list[str] = []
    buffer = b""
    try:
        while True:
            size = await reader.readuntil(b"\r\n")
            length = int(size.strip(), 16)
            if length == 0:
                return  # the server ended the stream
            buffer += (await reader.readexactly(length + 2))[:-2]
            *lines, buffer = buffer.split(b"\r\n")
            for raw in lines:
                line = raw.decode()
                if line == "":
                    if data:
                        stream.add(fields, "\n".join(data))
                        if finals and stream.finals >= finals:
                            return
                    fields, data = {}, []
                elif line.startswith(":"):
                    continue
                else:
                    name, _, value = line.partition(": ")
                    if name == "data":
                        data.append(value)
                    else:
                        fields[name] = value
    finally:
        writer.close()


async def run(port: int, path: str, clients: int, finals: int) -> dict[str, Any]:
    streams = [Stream(keep=n == 0) for n in range(clients)]
    tasks = []
    for stream in streams:
        tasks.append(asyncio.create_task(read_stream(port, path, stream, finals)))
        await asyncio.sleep(0)  # connect in order, without a burst of 1,000 handshakes at once
    await asyncio.gather(*(s.first for s in streams))
    print(json.dumps({"connected": clients}), flush=True)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    return {
        "events": streams[0].events,
        "clients": [
            {"count": s.count, "increasing": s.increasing, "digest": s.digest.hexdigest()[:16]}
            for s in streams
        ],
        "errors": errors[:5],
        "error_count": len(errors),
    }


def main(argv: list[str]) -> None:
    port, path, clients = int(argv[0]), argv[1], int(argv[2])
    finals = int(argv[3]) if len(argv) > 3 else 0
    print(json.dumps(asyncio.run(run(port, path, clients, finals))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
