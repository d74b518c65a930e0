"""Memory per open connection: rounds of TLS connections opened, held and closed.

Each round opens `connection_count` TLS connections to the server at once (handshake done),
holds them, then closes them all, and so does the same with as many clients that connect and
send nothing (they end during their handshake). The figure is the server's RSS once the
rounds are over, against its RSS when idle before them: what connections leave behind.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

from .common import Result, ServerProcess, Sizes, client_context, rss_bytes, simulator_env

MIB = 1024 * 1024
LEFT_BEHIND_TARGET = 30 * MIB
SETTLE_SECONDS = 3.0  # the server reclaims memory within 2 s of connections coming and going


def open_tls(port: int, count: int, context: ssl.SSLContext) -> list[ssl.SSLSocket]:
    return [
        context.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=30),
            server_hostname="127.0.0.1",
        )
        for _ in range(count)
    ]


def open_silent(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]


def measure(workdir: Path, cert: tuple[Path, Path], sizes: Sizes) -> list[Result]:
    count, rounds = sizes.connection_count, sizes.connection_rounds
    context = client_context()
    context.check_hostname = False
    server = ServerProcess(
        workdir / "output",
        cert,
        simulator_env(0.05, 0.01),
        args=["--max-connections", str(2 * count + 16)],
    )
    with server.start():
        time.sleep(SETTLE_SECONDS)
        idle = rss_bytes(server.pid)
        peak = idle
        for _ in range(rounds):
            held = open_tls(server.port, count, context)
            silent = open_silent(server.port, count)
            time.sleep(0.3)
            peak = max(peak, rss_bytes(server.pid))
            for sock in [*held, *silent]:
                sock.close()
        time.sleep(SETTLE_SECONDS)
        after = rss_bytes(server.pid)
    left = after - idle
    return [
        Result(
            f"RSS left by {rounds} rounds of {count} TLS + {count} silent connections",
            f"idle {idle / MIB:.0f} MiB, after {after / MIB:.0f} MiB (+{left / MIB:.1f} MiB)",
            f"≤ idle + {LEFT_BEHIND_TARGET // MIB} MiB",
            left <= LEFT_BEHIND_TARGET,
            note=f"peak while held {peak / MIB:.0f} MiB "
            f"({(peak - idle) / MIB / (2 * count) * 1024:.0f} KiB per open connection)",
            data={"idle": idle, "after": after, "peak": peak, "count": count, "rounds": rounds},
        )
    ]
