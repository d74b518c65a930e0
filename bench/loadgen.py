"""A pure-Python HTTPS load generator, for machines without `wrk`.

    python -m bench.loadgen HOST PORT PATH CONNECTIONS SECONDS

Keeps CONNECTIONS keep-alive connections busy with GET PATH (one request in flight on each,
like wrk) for SECONDS, then prints one JSON line: {"requests", "errors", "seconds",
"latencies"} (a sample of per-request latencies in seconds). One process drives at most one
core: Python is slower at this than the server it loads, so its figure is a lower bound.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Any

LATENCY_SAMPLE = 2000  # latencies kept, by reservoir sampling


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    seen: int = 0

    def record(self, latency: float) -> None:
        self.requests += 1
        self.seen += 1
        if len(self.latencies) < LATENCY_SAMPLE:
            self.latencies.append(latency)
        else:
            slot = random.randrange(self.seen)
            if slot < LATENCY_SAMPLE:
                self.latencies[slot] = latency


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def status_code(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


async def connection(
    host: str, port: int, request: bytes, start: asyncio.Event, deadline: list[float], tally: Tally
) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    await start.wait()
    clock = time.perf_counter
    try:
        while clock() < deadline[0]:
            sent = clock()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(content_length(head))
            if status_code(head) == 200:
                tally.record(clock() - sent)
            else:
                tally.errors += 1
    finally:
        writer.close()


async def run(host: str, port: int, path: str, connections: int, seconds: float) -> dict[str, Any]:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    tally = Tally()
    start = asyncio.Event()
    deadline = [0.0]
    tasks = [
        asyncio.create_task(connection(host, port, request, start, deadline, tally))
        for _ in range(connections)
    ]
    await asyncio.sleep(0.2)  # connected and handshaken before the clock starts
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.perf_counter() - began
    tally.errors += sum(1 for result in results if isinstance(result, BaseException))
    return {
        "requests": tally.requests,
        "errors": tally.errors,
        "seconds": elapsed,
        "latencies": tally.latencies,
    }


def main(argv: list[str]) -> None:
    host, port, path, connections, seconds = argv
    result = asyncio.run(run(host, int(port), path, int(connections), float(seconds)))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
