"""Event-stream clients that never read: what they cost the server, and how soon they go.

A job loads for as long as the measure lasts, and `stalled_jobs` jobs wait behind it, each
with a prompt of 1,000 emoji (4,000 bytes of UTF-8): the snapshot of `GET /events` is then
about 650 KiB, more than twice the client buffer (SD_REST_STREAM_BUFFER, 256 KiB). One client
reads it whole first (a legitimate reader with a big queue must get all of it). Then
`stalled_clients` TLS connections each send `GET /events` and never read. The server's RSS is
sampled from before they connect until every one has been dropped (counted from its log), and
the time from the last request to the last drop is compared with the ping interval.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import ssl
import time
from pathlib import Path

from .common import (
    Client,
    Result,
    ServerProcess,
    Sizes,
    client_context,
    rss_bytes,
    simulator_env,
)
from .streams import RssSampler

MIB = 1024 * 1024
RSS_TARGET = 50 * MIB
PROMPT = "\U0001f304" * 1000
DROPPED = "dropped an event-stream client"
SLACK = 1.0  # seconds past the ping interval for scheduling, on a shared machine


def read_snapshot(port: int, context: ssl.SSLContext) -> int:
    """Bytes of the `/events` snapshot a reading client gets (its whole first event)."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=60)
    try:
        conn.request("GET", "/events")
        response = conn.getresponse()
        size = 0
        while True:
            line = response.readline()
            if line.startswith(b"data: "):
                size = len(line)
            if not line or (size and line == b"\r\n"):
                return size
    finally:
        conn.close()


def stalled(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="127.0.0.1"
    )
    sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock


def drops(server: ServerProcess) -> int:
    try:
        return server.log_path.read_text(errors="replace").count(DROPPED)
    except OSError:
        return 0


def open_sockets(pid: int) -> int | None:
    """The server's open sockets (Linux /proc; None elsewhere)."""
    folder = Path(f"/proc/{pid}/fd")
    if not folder.exists():
        return None
    count = 0
    for fd in folder.iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


def measure(workdir: Path, cert: tuple[Path, Path], sizes: Sizes) -> list[Result]:
    clients, ping = sizes.stalled_clients, sizes.stalled_ping
    env = simulator_env(3600.0, 0.05, {"SD_REST_STREAM_PING": repr(ping)})
    context = client_context()
    server = ServerProcess(
        workdir / "output", cert, env, args=["--max-connections", str(clients + 64)]
    )
    with server.start():
        client = Client(server.port)
        client.submit({"prompt": "loads for the whole measure", "steps": 1})
        for n in range(sizes.stalled_jobs):
            client.submit({"prompt": PROMPT, "seed": n, "steps": 1})
        client.close()
        snapshot = read_snapshot(server.port, context)
        time.sleep(3.0)  # the listener gives memory back within 2 s of connections going
        sockets_before = open_sockets(server.pid)
        idle = rss_bytes(server.pid)
        with RssSampler(server.pid) as rss:
            held = [stalled(server.port, context) for _ in range(clients)]
            last_request = time.monotonic()
            deadline = last_request + ping + 30
            while drops(server) < clients and time.monotonic() < deadline:
                time.sleep(0.05)
            dropped_after = time.monotonic() - last_request
            dropped = drops(server)
            time.sleep(0.5)
        sockets_after = open_sockets(server.pid)
        for sock in held:
            sock.close()
    growth = rss.peak - idle
    in_time = dropped == clients and dropped_after <= ping + SLACK
    sockets = (
        f"; server sockets open before {sockets_before}, after the drops {sockets_after}"
        if sockets_before is not None
        else ""
    )
    return [
        Result(
            f"{clients} event-stream clients that never read a {snapshot / 1024:.0f} KiB "
            "snapshot: server RSS growth",
            f"{growth / MIB:.1f} MB",
            "≤ 50 MB",
            growth <= RSS_TARGET,
            f"{sizes.stalled_jobs} queued jobs with 1,000-emoji prompts; a reading client got "
            f"the whole snapshot ({snapshot:,} bytes) first; RSS {idle / MIB:.0f} MB before "
            f"the clients, peak {rss.peak / MIB:.0f} MB",
            {
                "snapshot_bytes": snapshot,
                "rss_before_mib": round(idle / MIB, 1),
                "rss_peak_mib": round(rss.peak / MIB, 1),
                "rss_mib_timeline": rss.samples[::5],
            },
        ),
        Result(
            "  the same clients: all dropped, last request → last drop",
            f"{dropped} of {clients} in {dropped_after:.1f} s",
            f"all, ≤ ping interval ({ping:g} s) + {SLACK:g} s",
            in_time,
            f"counted from the server's log ('{DROPPED}…', one line each){sockets}",
            {"dropped": dropped, "seconds": round(dropped_after, 2), "ping": ping},
        ),
    ]
