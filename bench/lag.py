"""Progress lag and image lag: from the moment the simulator prints a bar redraw (or closes a PNG)
to the first status GET that shows it.

The simulator appends `{"t": time.time(), "event": "step", ...}` right after each redraw is
flushed and `{"event": "image", ...}` right after each PNG is closed (SD_SIM_EVENT_LOG). A
poller process GETs the job's status back to back; a lag is `recv - t` for the first answer
that shows the event, so it includes up to one poll round trip (reported as the resolution).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import (
    ROOT,
    Client,
    Result,
    ServerProcess,
    Sizes,
    ms,
    percentile,
    simulator_env,
    summary_ms,
)

LOAD_SECONDS = 0.3
STEP_SECONDS = 0.05  # the simulator redraws at most every 0.1 s, like tqdm: every 2nd step
PROGRESS_TARGET = 0.020
IMAGE_TARGET = 0.050

Key = tuple[float, float]


@dataclass(frozen=True)
class Event:
    t: float
    kind: str  # "step" or "image"
    batch: int = 0
    step: int = 0
    total: int = 0


def read_events(path: Path, offset: int) -> tuple[list[Event], int]:
    """Events appended since `offset`, and the new offset."""
    try:
        data = path.read_bytes()[offset:]
    except FileNotFoundError:
        return [], offset
    events = []
    for line in data.decode().splitlines():
        record = json.loads(line)
        if record["event"] == "step":
            events.append(
                Event(record["t"], "step", record["batch"], record["step"], record["total"] or 0)
            )
        elif record["event"] == "image":
            events.append(Event(record["t"], "image"))
    return events, offset + len(data)


def progress_key(doc: dict[str, Any]) -> Key:
    """Where a status document says the job is, ordered: (image index, fraction of it)."""
    if doc["status"] == "COMPLETE":
        return (math.inf, math.inf)
    progress = doc.get("progress")
    if doc["status"] != "IN_PROGRESS" or progress is None:
        return (0, 0.0)
    return (progress["currentImageIndex"], progress["currentImageProgress"])


def step_key(event: Event) -> Key:
    # One image per batch (batchSize 1): batch b is image b + 1. The server rounds to 4 places.
    fraction = event.step / event.total if event.total else 0.0
    return (event.batch + 1, round(fraction, 4))


def first_seen(
    changes: list[dict[str, Any]], shows: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    return next((change for change in changes if shows(change["doc"])), None)


def lags(events: list[Event], changes: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(progress lags, image lags) in seconds, one per distinct step draw and per image."""
    step_lags: list[float] = []
    image_lags: list[float] = []
    seen_steps: set[tuple[int, int]] = set()
    images = 0
    for event in sorted(events, key=lambda e: e.t):
        if event.kind == "step":
            # The last step is drawn twice (rate-limited update, then close): count it once.
            if (event.batch, event.step) in seen_steps:
                continue
            seen_steps.add((event.batch, event.step))
            target = step_key(event)
            change = first_seen(changes, lambda doc, target=target: progress_key(doc) >= target)
            if change is not None:
                step_lags.append(change["recv"] - event.t)
        else:
            images += 1
            change = first_seen(
                changes, lambda doc, images=images: len(doc.get("imageUrls", [])) >= images
            )
            if change is not None:
                image_lags.append(change["recv"] - event.t)
    return step_lags, image_lags


def poll_periods(result: dict[str, Any]) -> list[float]:
    """How long each change could have been visible before the poller saw it: recv - prev_send."""
    return [change["recv"] - change["prev_send"] for change in result["changes"]]


def measure(workdir: Path, cert: tuple[Path, Path], sizes: Sizes) -> list[Result]:
    event_log = workdir / "events.jsonl"
    env = simulator_env(LOAD_SECONDS, STEP_SECONDS, {"SD_SIM_EVENT_LOG": str(event_log)})
    step_lags: list[float] = []
    image_lags: list[float] = []
    periods: list[float] = []
    polls = 0
    poll_seconds = 0.0
    with ServerProcess(workdir / "output", cert, env).start() as server:
        poller = subprocess.Popen(
            [sys.executable, "-m", "bench.poller", str(server.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert poller.stdin is not None and poller.stdout is not None
        client = Client(server.port)
        client.wait_warm()
        offset = event_log.stat().st_size if event_log.exists() else 0  # past the warm-up's
        try:
            for job in range(sizes.lag_jobs):
                url = client.submit(
                    {
                        "prompt": f"lag {job} {uuid.uuid4().hex}",
                        "steps": sizes.lag_steps,
                        "iterations": sizes.lag_iterations,
                    }
                )
                poller.stdin.write(url + "\n")
                poller.stdin.flush()
                result = json.loads(poller.stdout.readline())
                if result["changes"][-1]["doc"]["status"] != "COMPLETE":
                    raise RuntimeError(f"job {url} did not complete: {result['changes'][-1]}")
                events, offset = read_events(event_log, offset)
                if events and events[0].t < result["first_send"]:
                    raise RuntimeError("the job started before the poller was polling it")
                steps, images = lags(events, result["changes"])
                step_lags += steps
                image_lags += images
                periods += poll_periods(result)
                polls += result["polls"]
                poll_seconds += result["last_recv"] - result["first_send"]
        finally:
            poller.stdin.close()
            poller.wait(30)
            client.close()
    resolution = poll_seconds / polls if polls else math.nan
    note = f"one GET every {resolution * 1e6:.0f} µs from a separate process"
    # A change became visible between the last GET that missed it and the first that saw it.
    window = {"poll_window_p50_ms": round(percentile(periods, 50) * 1000, 3)}
    p95_step, p95_image = percentile(step_lags, 95), percentile(image_lags, 95)
    return [
        Result(
            "progress lag (bar redraw → GET shows it), p50 / p95",
            f"{ms(percentile(step_lags, 50))} / {ms(p95_step)}",
            "p95 ≤ 20 ms",
            p95_step <= PROGRESS_TARGET,
            f"{len(step_lags)} redraws of {sizes.lag_jobs} jobs; max {ms(max(step_lags))}; {note}",
            {**summary_ms(step_lags), "poll_us": round(resolution * 1e6, 1), **window},
        ),
        Result(
            "image lag (PNG closed → in imageUrls), p50 / p95",
            f"{ms(percentile(image_lags, 50))} / {ms(p95_image)}",
            "p95 ≤ 50 ms",
            p95_image <= IMAGE_TARGET,
            f"{len(image_lags)} images; max {ms(max(image_lags))}; {note}",
            {**summary_ms(image_lags), "poll_us": round(resolution * 1e6, 1), **window},
        ),
    ]
