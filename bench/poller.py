"""A tight status-GET loop in its own process, so that polling does not share a core with the
process that drives the benchmark.

    python -m bench.poller PORT

Reads one status path per line on stdin; GETs it back to back over one keep-alive HTTPS
connection until the job is finished, then writes one JSON line to stdout:
{"path", "polls", "first_send", "last_recv", "changes": [...]}, where every change is the first
answer that differed from the one before: {"prev_send", "send", "recv", "doc"}. prev_send is when
the last request that still saw the old state was sent: the new state became visible between
prev_send and recv. Times are time.time(), the clock the simulator writes its events with.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from .common import TERMINAL, Client


def poll(client: Client, path: str, timeout: float = 300.0) -> dict[str, Any]:
    clock = time.time
    changes: list[dict[str, Any]] = []
    last_body = b""
    prev_send = first_send = clock()
    polls = 0
    deadline = first_send + timeout
    while True:
        send = clock()
        status, body = client.request("GET", path)
        recv = clock()
        polls += 1
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")
        if body != last_body:
            doc = json.loads(body)
            changes.append({"prev_send": prev_send, "send": send, "recv": recv, "doc": doc})
            last_body = body
            if doc["status"] in TERMINAL:
                break
        if recv > deadline:
            raise RuntimeError(f"{path} did not finish within {timeout} s")
        prev_send = send
    return {
        "path": path,
        "polls": polls,
        "first_send": first_send,
        "last_recv": recv,
        "changes": changes,
    }


def main(argv: list[str]) -> None:
    client = Client(int(argv[0]))
    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        print(json.dumps(poll(client, path)), flush=True)
    client.close()


if __name__ == "__main__":
    main(sys.argv[1:])
