"""POST → response latency: sequential submissions over one keep-alive HTTPS connection."""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path

from PIL import Image

from .common import (
    Client,
    Result,
    ServerProcess,
    Sizes,
    ms,
    percentile,
    simulator_env,
    summary_ms,
    wait_idle,
)

# The first job "loads its model" for this long and the rest wait behind it: the script is
# asleep, so what is measured is the server (parsing, validation, the durable job folder).
IDLE_LOAD_SECONDS = 600.0
IMAGE_SIDE = 512


def text_job(n: int) -> dict[str, object]:
    # A distinct prompt per request: equal requests are deduplicated into one job.
    return {"prompt": f"benchmark submission {n} {uuid.uuid4().hex}", "steps": 8}


def multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode() + b"\r\n")
    for name, data in files.items():
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{name}.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def photo_png(side: int) -> bytes:
    """A gradient, so the PNG is not trivially small."""
    image = Image.linear_gradient("L").resize((side, side)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def timed_posts(client: Client, count: int) -> list[float]:
    latencies: list[float] = []
    for n in range(count):
        start = time.perf_counter()
        client.submit(text_job(n))
        latencies.append(time.perf_counter() - start)
    return latencies


def timed_uploads(client: Client, count: int) -> list[float]:
    image = photo_png(IMAGE_SIDE)
    latencies: list[float] = []
    for n in range(count):
        body, ctype = multipart({"prompt": f"upload {n} {uuid.uuid4().hex}"}, {"image": image})
        start = time.perf_counter()
        status, answer = client.request("POST", "/image-to-image", body, {"Content-Type": ctype})
        latencies.append(time.perf_counter() - start)
        if status != 303:
            raise RuntimeError(f"POST /image-to-image: {status} {answer[:200]!r}")
    return latencies


def measure(workdir: Path, cert: tuple[Path, Path], sizes: Sizes) -> list[Result]:
    env = simulator_env(IDLE_LOAD_SECONDS, 0.01)
    uploads = max(2, sizes.posts // 4)
    with ServerProcess(
        workdir / "output", cert, env, ["--max-queue", str(sizes.posts + uploads + 10)]
    ).start() as server:
        client = Client(server.port)
        client.get_json("/")  # the connection is open before the first timed request
        timed_posts(client, min(5, sizes.posts))  # warm-up: first-call imports, caches
        # Start-up is over (its background work, the first job's worker or script starting):
        # the figure is a settled server's.
        wait_idle(server.pid)
        latencies = timed_posts(client, sizes.posts)
        upload_latencies = timed_uploads(client, uploads)
        client.close()
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    up50, up99 = percentile(upload_latencies, 50), percentile(upload_latencies, 99)
    return [
        Result(
            "POST → response, p50 / p99",
            f"{ms(p50)} / {ms(p99)}",
            "≤ 5 ms / ≤ 20 ms",
            p50 <= 0.005 and p99 <= 0.020,
            f"{len(latencies)} sequential text-to-image POSTs (JSON), one keep-alive connection",
            summary_ms(latencies),
        ),
        Result(
            "  (info) POST with a 512×512 PNG upload, p50 / p99",
            f"{ms(up50)} / {ms(up99)}",
            "",
            None,
            f"{len(upload_latencies)} image-to-image multipart POSTs: decode + re-encode the image",
            summary_ms(upload_latencies),
        ),
    ]
