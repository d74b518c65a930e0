"""Restart and memory with thousands of jobs on disk.

Restart: from spawning `python -m sd_rest` on an output folder holding N finished and M queued job
folders to the first answered request, against the same with an empty folder (the difference is
what the jobs cost; the rest is the interpreter, imports and TLS set-up).

Memory: the server's RSS once it has started (and its background sweep of the job folders has
finished), and again after it has answered a status GET for every one of the jobs, which loads
each into memory.
"""

from __future__ import annotations

import json
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
    rss_bytes,
    simulator_env,
    summary_ms,
    wait_idle,
)
from .jobfolders import JobSet, generate

# The first queued job starts at once; it "loads its model" for the whole measurement.
IDLE_LOAD_SECONDS = 600.0
RESTART_TARGET = 1.0
MEMORY_TARGET = 80 * 1024 * 1024
MIB = 1024 * 1024


def start_once(output: Path, cert: tuple[Path, Path], env: dict[str, str]) -> ServerProcess:
    server = ServerProcess(output, cert, env).spawn()
    try:
        server.wait_ready(timeout=60, pause=0.001)
    except BaseException:
        server.stop()
        raise
    return server


def time_restarts(
    output: Path,
    cert: tuple[Path, Path],
    env: dict[str, str],
    count: int,
    probe: str | None,
    keep_last: bool = False,
) -> tuple[list[float], list[float], ServerProcess | None]:
    """Start the server `count` times: seconds from spawn to the first answered `GET /`, then
    of one GET of `probe`. With `keep_last`, the last server is left running and returned."""
    ready: list[float] = []
    probes: list[float] = []
    for n in range(count):
        server = start_once(output, cert, env)
        ready.append(time.monotonic() - server.started_at)
        try:
            if probe is not None:
                client = Client(server.port)
                client.get_json("/")  # connected; the next request is timed alone
                start = time.perf_counter()
                client.get_json(probe)
                probes.append(time.perf_counter() - start)
                client.close()
        except BaseException:
            server.stop()
            raise
        if keep_last and n == count - 1:
            return ready, probes, server
        server.stop()
    return ready, probes, None


def get_all(client: Client, urls: list[str]) -> list[float]:
    latencies = []
    for url in urls:
        start = time.perf_counter()
        client.get_json(url)
        latencies.append(time.perf_counter() - start)
    return latencies


def measure(workdir: Path, cert: tuple[Path, Path], sizes: Sizes) -> list[Result]:
    env = simulator_env(IDLE_LOAD_SECONDS, 0.01)
    empty_ready, _, _ = time_restarts(workdir / "empty" / "output", cert, env, sizes.restarts, None)
    output = workdir / "jobs" / "output"
    began = time.monotonic()
    jobs = generate(output, sizes.finished_jobs, sizes.queued_jobs)
    generated = time.monotonic() - began
    probe = jobs.urls()[len(jobs.finished) // 2]
    ready, probes, server = time_restarts(output, cert, env, sizes.restarts, probe, keep_last=True)
    assert server is not None
    with server:
        memory = measure_memory(server, jobs)
    restart = statistics.median(ready)
    empty = statistics.median(empty_ready)
    size = f"{sizes.finished_jobs:,} finished + {sizes.queued_jobs} queued"
    return [
        Result(
            f"restart: {size} job folders → first request served",
            ms(restart),
            "≤ 1 s",
            restart <= RESTART_TARGET,
            f"median of {sizes.restarts} starts; with an empty output folder {ms(empty)} "
            f"(interpreter, imports, TLS), so the jobs cost {ms(restart - empty)}; then the "
            f"first GET of a finished job (read from disk) {ms(statistics.median(probes))}",
            {
                "ready_ms": [round(x * 1000, 1) for x in ready],
                "empty_ready_ms": [round(x * 1000, 1) for x in empty_ready],
                "first_finished_get_ms": [round(x * 1000, 2) for x in probes],
                "generate_s": round(generated, 1),
            },
        ),
        memory,
    ]


def measure_memory(server: ServerProcess, jobs: JobSet) -> Result:
    settled = wait_idle(server.pid)
    started = rss_bytes(server.pid)
    client = Client(server.port)
    index = client.get_json("/")
    latencies = get_all(client, jobs.urls())
    again = get_all(client, jobs.urls()[:: max(1, len(jobs.urls()) // 1000)])
    client.close()
    served = rss_bytes(server.pid)
    unfinished = index.get("queued", 0) + index.get("running", 0)
    if "queued" in index and unfinished != len(jobs.queued):
        raise RuntimeError(f"the server recovered {unfinished} unfinished jobs: {index}")
    total = len(jobs.urls())
    return Result(
        f"server memory (RSS) with {total:,} jobs known: started / all served",
        f"{started / MIB:.0f} MB / {served / MIB:.0f} MB",
        "≤ 80 MB",
        max(started, served) <= MEMORY_TARGET,
        f"started = after its sweep of the folders ({settled:.1f} s); served = after a status GET "
        f"of every job: first GETs (from disk) p50 {ms(percentile(latencies, 50))}, "
        f"p99 {ms(percentile(latencies, 99))}; again (in memory) p50 "
        f"{ms(percentile(again, 50))}",
        {
            "rss_started_mib": round(started / MIB, 1),
            "rss_served_mib": round(served / MIB, 1),
            "first_get": summary_ms(latencies),
            "again_get": summary_ms(again),
            "index": json.loads(json.dumps(index)),
        },
    )
