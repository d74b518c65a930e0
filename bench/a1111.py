"""AUTOMATIC1111's dialect: what waiting for a job inside one request costs against our own
POST-then-poll, and whether base64-encoding a big batch disturbs other requests.

1. The same one-image job (distinct prompts, so nothing is deduplicated) through
   POST /sdapi/v1/txt2img, and through POST /text-to-image then GETs of its status every 5 ms
   until COMPLETE and a GET of its image: end to end, alternating, p95 of each; the difference
   is what the dialect adds.
2. A batch of eight 512×512 images made once, then asked again and again (the same settings:
   the same job, answered at once), so each answer is the base64 of eight PNGs; meanwhile
   status GETs on another connection, their p95 against the same GETs with nothing else:
   unaffected when within 1 ms of it.
"""

from __future__ import annotations

import json
import multiprocessing
import time
import uuid
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

from .common import Client, Result, ServerProcess, Sizes, ms, percentile, simulator_env, summary_ms

STEPS = 4
SIDE = 256
BATCH = {"prompt": "a batch to encode", "steps": 4, "seed": 1, "batch_size": 8}
UNAFFECTED_MARGIN = 0.001  # seconds a status GET's p95 may grow while batches are encoded


def _a1111(client: Client, doc: dict[str, object]) -> bytes:
    status, body = client.request(
        "POST", "/sdapi/v1/txt2img", json.dumps(doc).encode(), {"Content-Type": "application/json"}
    )
    if status != 200:
        raise RuntimeError(f"POST /sdapi/v1/txt2img: {status} {body[:200]!r}")
    return body


def _native(client: Client, prompt: str) -> None:
    url = client.submit({"prompt": prompt, "steps": STEPS, "width": SIDE, "height": SIDE})
    doc = client.wait_status(url, {"COMPLETE"})
    status, _ = client.request("GET", doc["imageUrls"][0])
    if status != 200:
        raise RuntimeError(f"GET {doc['imageUrls'][0]}: {status}")


def _one_image(client: Client, jobs: int) -> tuple[list[float], list[float]]:
    dialect, native = [], []
    for n in range(jobs):
        prompt = f"one image {n} {uuid.uuid4().hex}"
        start = time.perf_counter()
        _a1111(client, {"prompt": prompt, "steps": STEPS, "width": SIDE, "height": SIDE})
        dialect.append(time.perf_counter() - start)
        start = time.perf_counter()
        _native(client, prompt + " native")
        native.append(time.perf_counter() - start)
    return dialect, native


def _gets(port: int, url: str, seconds: float) -> list[float]:
    client, latencies = Client(port), []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.perf_counter()
        client.request("GET", url)
        latencies.append(time.perf_counter() - start)
    client.close()
    return latencies


def _encode_batches(port: int, stop: Event, answers: Queue) -> None:
    """In a process of its own: asks for the batch again and again until `stop`; each
    answer's time goes to `answers`. (Reading megabytes of JSON in the measuring process
    would slow its own GETs down.)"""
    client = Client(port)
    while not stop.is_set():
        start = time.perf_counter()
        body = _a1111(client, BATCH)
        answers.put(time.perf_counter() - start)
        if len(json.loads(body)["images"]) != 8:
            raise RuntimeError("an answer without its eight images")
    client.close()


def _encoding(port: int, seconds: float) -> tuple[list[float], list[float], list[float]]:
    client = Client(port)
    _a1111(client, BATCH)  # made once; from now on each answer only encodes
    url = client.submit(
        {"prompt": "a status to read", "steps": STEPS, "width": SIDE, "height": SIDE}
    )
    client.wait_status(url, {"COMPLETE"})
    client.close()
    quiet = _gets(port, url, seconds)
    stop: Event = multiprocessing.Event()
    queue: Queue = multiprocessing.Queue()
    loader = multiprocessing.Process(target=_encode_batches, args=(port, stop, queue))
    loader.start()
    busy = _gets(port, url, seconds)
    stop.set()
    loader.join(60)
    answers: list[float] = []
    while not queue.empty():
        answers.append(queue.get())
    if loader.exitcode != 0 or not answers:
        raise RuntimeError(f"the batch-encoding client failed ({loader.exitcode})")
    return quiet, busy, answers


def measure(workdir: Path, cert: tuple[Path, Path], sizes: Sizes) -> list[Result]:
    env = simulator_env(0.0, 0.002)
    with ServerProcess(workdir / "output", cert, env).start() as server:
        client = Client(server.port)
        client.wait_warm()
        _one_image(client, 2)  # warm-up
        dialect, native = _one_image(client, sizes.a1111_jobs)
        client.close()
        quiet, busy, answers = _encoding(server.port, sizes.a1111_seconds)
    extra = percentile(dialect, 95) - percentile(native, 95)
    q95, b95 = percentile(quiet, 95), percentile(busy, 95)
    return [
        Result(
            "/sdapi/v1/txt2img vs POST + poll, one image: p95 difference",
            f"{ms(extra)} ({ms(percentile(dialect, 95))} vs {ms(percentile(native, 95))})",
            "≤ 20 ms",
            extra <= 0.020,
            f"{len(dialect)} jobs each way, alternating; poll every 5 ms",
            {"a1111": summary_ms(dialect), "native": summary_ms(native)},
        ),
        Result(
            "status GET p95 while batches of 8 are base64-encoded",
            f"{ms(b95)} (quiet {ms(q95)})",
            f"unaffected: ≤ quiet p95 + {ms(UNAFFECTED_MARGIN)}",
            b95 <= q95 + UNAFFECTED_MARGIN,
            f"unaffected means a p95 within {ms(UNAFFECTED_MARGIN)} of the quiet one; "
            f"{len(answers)} answers of eight 512×512 PNGs, p50 {ms(percentile(answers, 50))} "
            f"each; {len(busy)} GETs meanwhile, {len(quiet)} quiet",
            {"quiet": summary_ms(quiet), "busy": summary_ms(busy), "answers": summary_ms(answers)},
        ),
    ]
