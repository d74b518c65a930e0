"""Thousands of job folders on disk, in the store's real format, without running thousands of jobs.

Each folder is what the server leaves behind: `job.json` (Job.to_sidecar()), `job.log`, `inputs/`
for the endpoints that take uploads, and `<n>.png` for every recorded image (hard links to one
small PNG, which is all a status GET or a restart looks at). Unfinished jobs also get their
`.queue/<endpoint>.<id>` marker, as the store writes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from sd_rest.endpoints import ENDPOINTS, IMAGE_TO_IMAGE, INPAINT_IMAGE, TEXT_TO_IMAGE
from sd_rest.state.jobs import ImageRecord, Job, Status, job_id

SIDECAR = "job.json"
QUEUE = ".queue"
# The mix of a long-used server: mostly text-to-image, mostly complete.
ENDPOINT_MIX = [TEXT_TO_IMAGE] * 16 + [IMAGE_TO_IMAGE] * 3 + [INPAINT_IMAGE]
PROMPT_WORDS = ("a", "photograph", "of", "an", "astronaut", "riding", "horse", "oil", "city")
LOG_TEXT = (
    "\n=== sd-rest run 1: ['python', 'scripts/txt2img.py', ...]\n"
    "Global seed set to 42\nLoading model from models/ldm/stable-diffusion-v1/model.ckpt\n"
    + "Sampling:  100%|██████████| 1/1 [00:31<00:00, 31.02s/it]\n"
    * 8
)


@dataclass
class JobSet:
    finished: list[tuple[str, str]] = field(default_factory=list)  # (endpoint, id)
    queued: list[tuple[str, str]] = field(default_factory=list)

    def urls(self) -> list[str]:
        return [f"/{endpoint}/{id_}" for endpoint, id_ in self.finished + self.queued]


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 140, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def demo_checkpoint(endpoint: str) -> str:
    """The checkpoint a demo server records for this endpoint's jobs."""
    from sd_rest.setup.demo import SIMULATOR

    model = ENDPOINTS[endpoint].model
    return str((SIMULATOR / "models" / "demo" / f"{model}.ckpt").resolve())


def make_job(endpoint: str, n: int, rng: random.Random, finished: bool) -> Job:
    # In the order validation returns them: the endpoint's defaults, every one filled in.
    params: dict[str, int | float | str] = {}
    for name, default in ENDPOINTS[endpoint].defaults.items():
        if name == "prompt":
            params[name] = " ".join(rng.choices(PROMPT_WORDS, k=rng.randint(4, 14))) + f" #{n}"
        elif name in ("iterations", "batchSize"):
            params[name] = rng.randint(1, 3) if name == "iterations" else rng.randint(1, 2)
        elif name == "seed":
            params[name] = rng.randrange(2**32)
        else:
            assert default is not None
            params[name] = default
    uploads = {
        name: hashlib.sha256(f"{n}-{name}".encode()).hexdigest()
        for name in ENDPOINTS[endpoint].files
    }
    inputs = (
        {"image": "image.png", "mask": "image_mask.png"}
        if endpoint == INPAINT_IMAGE
        else {name: f"{name}.png" for name in uploads}
    )
    checkpoint = demo_checkpoint(endpoint)
    created = 1_750_000_000.0 + n * 40.0
    job = Job(
        id=job_id(endpoint, params, checkpoint, uploads),
        endpoint=endpoint,
        params=params,
        checkpoint=checkpoint,
        uploads=uploads,
        inputs=inputs,
        seq=int(created * 1e9),
        created_at=created,
        updated_at=created,
    )
    if not finished:
        return job
    outcome = rng.random()
    made = job.total_images if outcome < 0.93 else rng.randrange(job.total_images)
    job.images = tuple(
        ImageRecord(
            n=i, seed=int(params["seed"]), position=i, sha256=hashlib.sha256(b"%d" % i).hexdigest()
        )
        for i in range(1, made + 1)
    )
    job.status = (
        Status.COMPLETE
        if made == job.total_images
        else Status.FAILED
        if outcome < 0.98
        else Status.CANCELED
    )
    if job.status is Status.FAILED:
        job.error = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    job.started_at = created + 1.0
    job.finished_at = job.updated_at = created + 1.0 + 31.0 * max(made, 1)
    job.attempts = 1
    return job


def write_job(output: Path, job: Job, png: Path) -> None:
    folder = output / job.endpoint / job.id
    (folder / "inputs").mkdir(parents=True)
    for name in job.inputs.values():
        os.link(png, folder / "inputs" / name)
    for image in job.images:
        os.link(png, folder / f"{image.n}.png")
    (folder / "job.log").write_text(LOG_TEXT)
    # The store's own serialisation: indented JSON of Job.to_sidecar().
    data = json.dumps(job.to_sidecar(), indent=1, ensure_ascii=False).encode()
    (folder / SIDECAR).write_bytes(data)


def generate(output: Path, finished: int, queued: int, seed: int = 5) -> JobSet:
    """`finished` finished and `queued` QUEUED job folders under `output` (which must not hold
    any yet); queued jobs are text-to-image and come after the finished ones."""
    rng = random.Random(seed)
    output.mkdir(parents=True, exist_ok=True)
    png = output.parent / "tiny.png"
    png.write_bytes(tiny_png())
    jobs = JobSet()
    (output / QUEUE).mkdir(exist_ok=True)
    for n in range(finished + queued):
        is_finished = n < finished
        endpoint = ENDPOINT_MIX[n % len(ENDPOINT_MIX)] if is_finished else TEXT_TO_IMAGE
        job = make_job(endpoint, n, rng, is_finished)
        if not is_finished:
            # The marker is written before the sidecar, as the store does.
            (output / QUEUE / f"{job.endpoint}.{job.id}").touch()
        write_job(output, job, png)
        (jobs.finished if is_finished else jobs.queued).append((job.endpoint, job.id))
    return jobs
