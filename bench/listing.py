"""The job listing with thousands of finished jobs on disk (jobfolders.py).

Pages: GET /jobs of 50 items on one keep-alive connection: the first page again and again,
every page of the whole listing by its cursors, and filtered pages (failed jobs; one endpoint).

First page after a restart: from spawning the server on a folder whose index was closed in
order (SIGTERM) to the first answered GET /jobs, a new connection attempted every 2 ms. Also,
for information: the same after a crash (kill -9: every sidecar is read again) and on the
first start, when there is no index yet.
"""

from __future__ import annotations

import signal
import statistics
import time
from pathlib import Path

from .common import (
    Client,
    Result,
    ServerProcess,
    Sizes,
    ms,
    percentile,
    simulator_env,
    summary_ms,
)
from .jobfolders import generate

PAGE_TARGET = 0.020
FIRST_PAGE_TARGET = 1.0
PAGE = "/jobs?limit=50"


def first_page(server: ServerProcess, timeout: float = 120.0) -> float:
    """Seconds from spawn to the first answered page (connection attempts every 2 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            raise RuntimeError(f"the server exited:\n{server.log()}")
        client = Client(server.port, timeout=timeout)
        try:
            status, body = client.request("GET", PAGE)
            if status == 200 and b'"items"' in body:
                return time.monotonic() - server.started_at
        except OSError:
            time.sleep(0.002)
        finally:
            client.close()
    raise RuntimeError(f"no page within {timeout} s:\n{server.log()}")


def timed_pages(client: Client, paths: list[str]) -> tuple[list[float], list[dict]]:
    latencies, docs = [], []
    for path in paths:
        start = time.perf_counter()
        docs.append(client.get_json(path))
        latencies.append(time.perf_counter() - start)
    return latencies, docs


def walk(client: Client, query: str, limit: int) -> tuple[list[float], int]:
    """Every page of `query` by its cursors: latencies, and how many items."""
    latencies: list[float] = []
    items = 0
    cursor = None
    while True:
        path = f"/jobs?limit=50{query}" + (f"&cursor={cursor}" if cursor else "")
        took, (doc,) = timed_pages(client, [path])
        latencies += took
        items += len(doc["items"])
        cursor = doc["nextCursor"]
        if cursor is None or len(latencies) >= limit:
            return latencies, items


def measure(workdir: Path, cert: tuple[Path, Path], sizes: Sizes) -> list[Result]:
    env = simulator_env(600.0, 0.01)
    output = workdir / "output"
    jobs = generate(output, sizes.finished_jobs, 0)
    total = len(jobs.finished)
    server = ServerProcess(output, cert, env).spawn()
    try:
        built = first_page(server)
        client = Client(server.port)
        client.get_json(PAGE)  # connected; what follows is timed alone
        repeated, _ = timed_pages(client, [PAGE] * sizes.listing_pages)
        walked, seen = walk(client, "", 10 * sizes.listing_pages)
        if seen != total and len(walked) < 10 * sizes.listing_pages:
            raise RuntimeError(f"the listing holds {seen} of {total} jobs")
        failed, _ = walk(client, "&status=failed", sizes.listing_pages)
        inpaint, _ = walk(client, "&endpoint=inpaint-image", sizes.listing_pages)
        client.close()
    finally:
        server.stop()
    restarts: list[float] = []
    for _ in range(sizes.restarts):
        server = ServerProcess(output, cert, env).spawn()
        try:
            restarts.append(first_page(server))
        finally:
            server.stop()
    server = ServerProcess(output, cert, env).spawn()
    first_page(server)
    assert server.process is not None
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    server = ServerProcess(output, cert, env).spawn()
    try:
        after_crash = first_page(server)
    finally:
        server.stop()
    pages = repeated + walked + failed + inpaint
    p95 = percentile(pages, 95)
    restart = statistics.median(restarts)
    return [
        Result(
            f"listing: a page of 50 of {total:,} finished jobs, p50 / p95",
            f"{ms(percentile(pages, 50))} / {ms(p95)}",
            "p95 ≤ 20 ms",
            p95 <= PAGE_TARGET,
            f"{len(pages)} pages on one keep-alive connection: the first page "
            f"{len(repeated)} times (p95 {ms(percentile(repeated, 95))}), every page by cursor "
            f"(p95 {ms(percentile(walked, 95))}), failed only (p95 "
            f"{ms(percentile(failed, 95))}), one endpoint (p95 {ms(percentile(inpaint, 95))})",
            {
                "first": summary_ms(repeated),
                "walk": summary_ms(walked),
                "failed": summary_ms(failed),
                "endpoint": summary_ms(inpaint),
            },
        ),
        Result(
            f"listing: first page after a restart ({total:,} finished jobs)",
            ms(restart),
            "≤ 1 s",
            restart <= FIRST_PAGE_TARGET,
            f"spawn → first page, median of {sizes.restarts} restarts after a SIGTERM (index "
            f"closed in order); after a kill -9 (every sidecar read again) {ms(after_crash)}; "
            f"first start, no index yet {ms(built)}",
            {
                "restart_ms": [round(x * 1000, 1) for x in restarts],
                "after_crash_ms": round(after_crash * 1000, 1),
                "first_start_ms": round(built * 1000, 1),
            },
        ),
    ]
