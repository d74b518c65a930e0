"""Event streams: how soon an event reaches a client, and 1,000 clients on one running job.

Event lag: the simulator logs `time.time()` right after each bar redraw is flushed and each PNG
is closed (SD_SIM_EVENT_LOG, as for the GET lag in lag.py); a client process reads the job's
event stream and stamps every event as it arrives. A lag is the first event showing the redraw
(or the image) minus the log's time: no polling, so no poll period in it.

1,000 clients: one process holds that many streams on one job, from before it starts until its
stream ends; every client's (id, event, data) sequence is hashed and compared. Meanwhile the
server's RSS is sampled, and status GETs per second are measured as by get_throughput.py:
first on a running job without streams, then on the streamed job while it runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

from .common import (
    ROOT,
    Client,
    Result,
    ServerProcess,
    Sizes,
    ms,
    percentile,
    rss_bytes,
    simulator_env,
    summary_ms,
)
from .get_throughput import Rounds, choose_generator, generate_load
from .lag import Event, read_events, step_key

LOAD_SECONDS = 0.3
STEP_SECONDS = 0.05
LAG_TARGET = 0.020
IMAGE_TARGET = 0.050
FANOUT_STEP_SECONDS = 0.25  # the job get_throughput.py loads: a redraw every 0.25 s
RSS_TARGET = 50 * 1024 * 1024
RATE_TARGET = 0.80
MIB = 1024 * 1024


def sse_clients(port: int, path: str, clients: int, finals: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.sse_client", str(port), path, str(clients), str(finals)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def read_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The client process's next JSON line (it prints two: connected, then the results)."""
    stdout: IO[str] | None = proc.stdout
    assert stdout is not None
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not box or not box[0]:
        proc.kill()
        raise RuntimeError(f"the stream clients said nothing within {timeout:.0f} s")
    return json.loads(box[0])


def job_stream_lags(
    port: int, url: str, event_log: Path, offset: int
) -> tuple[list[float], list[float], int]:
    """One job's (progress lags, image lags) as one client of its event stream sees them, and
    the event log's new offset. The client connects right after the POST: a job that drew a
    step before is an error (its first lag would be lost)."""
    proc = sse_clients(port, f"{url}/events", 1)
    connected_at = time.time()
    read_line(proc, 60)
    result = read_line(proc, 300)
    proc.wait(30)
    received = result["events"]
    if received[-1]["event"] != "complete":
        raise RuntimeError(f"job {url} did not complete: {received[-1]}")
    events, offset = read_events(event_log, offset)
    if events and events[0].t < connected_at:
        raise RuntimeError("the job drew its first step before the client connected")
    steps, images = stream_lags(events, received)
    return steps, images, offset


def stream_lags(events: list[Event], received: list[dict[str, Any]]) -> tuple[list[float], ...]:
    """(progress lags, image lags): each redraw and each PNG against the first event that
    shows it."""
    shown = []
    images = []
    for event in received:
        data = json.loads(event["data"])
        if event["event"] in ("started", "progress"):
            progress = data["progress"]
            key = (progress["currentImageIndex"], progress["currentImageProgress"])
            shown.append((event["recv"], key))
        elif event["event"] == "image":
            images.append(event["recv"])
    step_lags: list[float] = []
    image_lags: list[float] = []
    seen: set[tuple[int, int]] = set()
    done = 0
    for event in sorted(events, key=lambda e: e.t):
        if event.kind == "step":
            if (event.batch, event.step) in seen:
                continue  # the last step is drawn twice (update, then close)
            seen.add((event.batch, event.step))
            target = step_key(event)
            first = next((recv for recv, key in shown if key >= target), None)
            if first is not None:
                step_lags.append(first - event.t)
        else:
            if done < len(images):
                image_lags.append(images[done] - event.t)
            done += 1
    return step_lags, image_lags


def measure_lag(workdir: Path, cert: tuple[Path, Path], sizes: Sizes) -> list[Result]:
    event_log = workdir / "events.jsonl"
    env = simulator_env(LOAD_SECONDS, STEP_SECONDS, {"SD_SIM_EVENT_LOG": str(event_log)})
    step_lags: list[float] = []
    image_lags: list[float] = []
    with ServerProcess(workdir / "output", cert, env).start() as server:
        client = Client(server.port)
        client.wait_warm()
        offset = event_log.stat().st_size if event_log.exists() else 0  # past the warm-up's
        try:
            for job in range(sizes.lag_jobs):
                url = client.submit(
                    {
                        "prompt": f"event lag {job} {uuid.uuid4().hex}",
                        "steps": sizes.lag_steps,
                        "iterations": sizes.lag_iterations,
                    }
                )
                steps, images, offset = job_stream_lags(server.port, url, event_log, offset)
                step_lags += steps
                image_lags += images
        finally:
            client.close()
    p95, image_p95 = percentile(step_lags, 95), percentile(image_lags, 95)
    return [
        Result(
            "event lag (bar redraw → progress event at a client), p50 / p95",
            f"{ms(percentile(step_lags, 50))} / {ms(p95)}",
            "p95 ≤ 20 ms",
            p95 <= LAG_TARGET,
            f"{len(step_lags)} redraws of {sizes.lag_jobs} jobs; max {ms(max(step_lags))}; "
            "one client in its own process, receive time of the event",
            summary_ms(step_lags),
        ),
        Result(
            "  (info) image event lag (PNG closed → image event at a client), p50 / p95",
            f"{ms(percentile(image_lags, 50))} / {ms(image_p95)}",
            "",
            None,
            f"{len(image_lags)} images; max {ms(max(image_lags))}",
            summary_ms(image_lags),
        ),
    ]


class RssSampler:
    """The server's RSS every 0.2 s, in a thread, until stopped: its peak."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        began = time.monotonic()
        while not self._stop.is_set():
            rss = rss_bytes(self.pid)
            self.peak = max(self.peak, rss)
            self.samples.append((round(time.monotonic() - began, 1), rss // MIB))
            self._stop.wait(0.2)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss_bytes(self.pid))


def check_sequence(events: list[dict[str, Any]]) -> str:
    """What is wrong with client 0's events ('' if nothing): a snapshot, then the run in order,
    one final complete."""
    names = [event["event"] for event in events]
    if names[0] != "snapshot" or names[-1] != "complete" or names.count("complete") != 1:
        return f"unexpected sequence {names[:3]} … {names[-3:]}"
    if "started" not in names:
        return "no started event"
    progress = [
        tuple(json.loads(e["data"])["progress"].values())[:2]
        for e in events
        if e["event"] in ("started", "progress")
    ]
    return "" if progress == sorted(progress) else "progress went backwards"


def measure_fanout(
    workdir: Path, cert: tuple[Path, Path], sizes: Sizes, generator: str = "auto"
) -> list[Result]:
    generator = choose_generator(generator)
    clients = sizes.stream_clients
    env = simulator_env(0.0, FANOUT_STEP_SECONDS)
    args = ["--max-connections", str(clients + 500)]
    without, with_streams = Rounds(), Rounds()
    with ServerProcess(workdir / "output", cert, env, args).start() as server:
        client = Client(server.port)
        # Job A runs (250 steps of 0.25 s) while the GETs are measured without streams.
        first = client.submit({"prompt": f"fanout first {uuid.uuid4().hex}", "steps": 250})
        client.wait_status(first, {"IN_PROGRESS"})
        # The RSS to compare with: its peak under the same GET load, without streams (the
        # load's own connections cost memory too).
        with RssSampler(server.pid) as baseline:
            for _ in range(sizes.get_rounds):
                without.add(server.pid, lambda: generate_load(generator, server.port, first, sizes))
        rss_before = baseline.peak
        # Job B waits behind A; the clients connect to it, then A is canceled and B runs long
        # enough for the same rounds.
        steps = max(8, int((sizes.get_rounds * (sizes.get_seconds + 1) + 6) / FANOUT_STEP_SECONDS))
        second = client.submit(
            {"prompt": f"fanout streamed {uuid.uuid4().hex}", "steps": min(steps, 250)}
        )
        with RssSampler(server.pid) as rss:
            proc = sse_clients(server.port, f"{second}/events", clients)
            began = time.monotonic()
            read_line(proc, 300)
            connect_seconds = time.monotonic() - began
            client.request("DELETE", first)
            client.wait_status(second, {"IN_PROGRESS"})
            for _ in range(sizes.get_rounds):
                with_streams.add(
                    server.pid, lambda: generate_load(generator, server.port, second, sizes)
                )
            result = read_line(proc, 600)
        proc.wait(30)
        client.close()
    digests = {c["digest"] for c in result["clients"]}
    counts = {c["count"] for c in result["clients"]}
    in_order = all(c["increasing"] for c in result["clients"])
    problem = check_sequence(result["events"])
    every = len(digests) == 1 and in_order and not problem and result["error_count"] == 0
    if not every:
        raise RuntimeError(
            f"the clients did not all get the same events in order: {len(digests)} digests, "
            f"counts {sorted(counts)[:5]}, in order {in_order}, {problem}, errors "
            f"{result['errors']}"
        )
    growth = rss.peak - rss_before
    ratio = with_streams.rate / without.rate if without.rate else 0.0
    events = len(result["events"])
    return [
        Result(
            f"{clients:,} clients streaming one running job: every event, in order",
            f"{clients:,} × {events} events, identical",
            "all, in order",
            True,
            f"one process holds the {clients} streams (connected in {connect_seconds:.1f} s); "
            "each client's (id, event, data) sequence hashed and compared",
            {"clients": clients, "events": events, "connect_s": round(connect_seconds, 1)},
        ),
        Result(
            f"  server RSS growth with {clients:,} streams",
            f"{growth / MIB:.1f} MB",
            "≤ 50 MB",
            growth <= RSS_TARGET,
            f"peak RSS under the GET load without streams {rss_before / MIB:.0f} MB, with "
            f"the streams (connecting, then the job's run under the same load) "
            f"{rss.peak / MIB:.0f} MB",
            {
                "rss_before_mib": round(rss_before / MIB, 1),
                "rss_peak_mib": round(rss.peak / MIB, 1),
                "rss_mib_timeline": rss.samples[::5],
            },
        ),
        Result(
            f"  status GETs per second with {clients:,} streams / without",
            f"{with_streams.rate:,.0f}/s / {without.rate:,.0f}/s ({ratio:.0%})",
            "≥ 80 %",
            ratio >= RATE_TARGET if generator == "wrk" else None,
            f"{generator}, {sizes.get_connections} connections, median of {sizes.get_rounds} × "
            f"{sizes.get_seconds} s each; server CPU {with_streams.cpu:.0f} / "
            f"{without.cpu:.0f} µs per GET (the streams' writes included)",
            {"with": with_streams.to_json(), "without": without.to_json()},
        ),
    ]
