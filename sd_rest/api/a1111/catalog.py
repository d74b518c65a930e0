"""What AUTOMATIC1111's clients read at connect, answered truthfully and small: the model
(only the text-to-image checkpoint is a checkpoint to choose: the inpaint one runs by itself
for an img2img with a mask), the options, the samplers, empty lists of what sd-rest does not
have, and the progress of the work. Pure."""

from __future__ import annotations

import re
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sd_rest.runs.labels import MODEL_HASH_LENGTH
from sd_rest.state.jobs import Job, Status
from sd_rest.state.layout import Key

_CHECKSUM: Final = re.compile(r"\s*\[[^]]*\]\s*$")  # a title's " [hash]"
CONFIG: Final = "configs/stable-diffusion/v1-inference.yaml"  # in the repository
SAMPLERS: Final = [
    {"name": "DDIM", "aliases": ["ddim"], "options": {}},
    # txt2img.py's --plms; img2img and inpainting run DDIM (named in their info).
    {"name": "PLMS", "aliases": ["plms"], "options": {"txt2img_only": "True"}},
]
SCHEDULERS: Final = [
    {
        "name": "uniform",
        "label": "Uniform",
        "aliases": None,
        "default_rho": -1,
        "need_inner_model": False,
    }
]
UPSCALERS: Final = [
    {"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}
]

PREFIX: Final = "/sdapi/v1"
# The lists clients read at connect: path under PREFIX -> the answer.
GET_LISTS: Final[dict[str, Any]] = {
    "/scripts": {"txt2img": [], "img2img": []},
    "/upscalers": UPSCALERS,
    "/latent-upscale-modes": [],
    "/schedulers": SCHEDULERS,
    "/sd-vae": [],
    "/loras": [],
    "/samplers": SAMPLERS,
}


@dataclass(frozen=True)
class Model:
    """The text-to-image checkpoint as AUTOMATIC1111 lists one."""

    path: Path
    sha256: str | None  # None until provenance has hashed it

    @property
    def title(self) -> str:
        short = self.sha256[:MODEL_HASH_LENGTH] if self.sha256 else None
        return f"{self.path.name} [{short}]" if short else self.path.name

    @property
    def model_name(self) -> str:
        return self.path.stem

    def entry(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "model_name": self.model_name,
            "hash": self.sha256[:MODEL_HASH_LENGTH] if self.sha256 else None,
            "sha256": self.sha256,
            "filename": self.path.name,  # never the server's folders
            "config": CONFIG,
        }

    def answers_to(self, name: str) -> bool:
        """Whether a client's sd_model_checkpoint names this model: its title, with or without
        the hash, its name or file name, or its short or whole hash (as AUTOMATIC1111 looks a
        checkpoint up). A title whose hash is another (read before the file changed, or
        before it was hashed) names it by its name part, as AUTOMATIC1111's closest match
        strips the checksum."""
        names = {self.title, self.path.name, self.model_name}
        if self.sha256:
            names |= {self.sha256, self.sha256[:MODEL_HASH_LENGTH], self.sha256[:8]}
        wanted = name.strip()
        return wanted in names or _CHECKSUM.sub("", wanted) in {self.path.name, self.model_name}


def options(model: Model) -> dict[str, Any]:
    return {
        "sd_model_checkpoint": model.title,
        "sd_checkpoint_hash": model.sha256,
        "samples_format": "png",
        "samples_save": True,
        "save_images_add_number": True,
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "eta_ddim": 0.0,
        "eta_noise_seed_delta": 0,
        "enable_pnginfo": True,
    }


def idle() -> dict[str, Any]:
    """What SillyTavern and webuiapi wait for: exactly progress 0 and job_count 0."""
    return _progress(0, 0.0, 0, 0, 0, None)


def running(runs: Sequence[Job], queue: Container[Job]) -> list[Job]:
    """Of the jobs with a run (RunningJobs.snapshot), those out of the queue: IN_PROGRESS, or
    taken by a worker and starting. With --broker, a job handed to the worker hosts has a run
    while it still waits in the queue for one of them: it is not running."""
    return [job for job in runs if job not in queue]


def interruptible(running: Sequence[Job], ours: Container[Key]) -> list[Job]:
    """What `interrupt` ends: the running jobs this dialect's callers wait for (AUTOMATIC1111
    stops its current job only; our own API's jobs run on)."""
    return [job for job in running if (job.endpoint, job.id) in ours]


def progress(running: Sequence[Job], waiting: int, now: float | None = None) -> dict[str, Any]:
    """The first IN_PROGRESS job's progress (0 while none is: a script still starting);
    job_count: the jobs running and waiting, so that 0 means nothing left to do."""
    count = len(running) + waiting
    if count == 0:
        return idle()
    job = next((job for job in running if job.status is Status.IN_PROGRESS), None)
    if job is None:
        return _progress(0, 0.0, count, 0, 0, None)
    fraction, step, steps = _fraction(job)
    eta = 0.0
    started = job.started_at
    if fraction > 0 and started is not None:
        elapsed = max(0.0, (time.time() if now is None else now) - started)
        eta = elapsed / fraction - elapsed
    return _progress(round(fraction, 4), round(eta, 2), count, step, steps, job)


def _fraction(job: Job) -> tuple[float, int, int]:
    """(the job's share done, the current image's step, its steps)."""
    if job.status is not Status.IN_PROGRESS or job.progress is None:
        return 0.0, 0, 0
    index, image_fraction = job.progress
    total = max(job.total_images, 1)
    steps = int(job.params.get("steps", 0))
    if "strength" in job.params:  # img2img samples int(strength × steps) steps
        steps = int(float(job.params["strength"]) * steps)
    done = (index - 1 + image_fraction) / total
    return min(done, 1.0), round(image_fraction * steps), steps


def _progress(
    fraction: float, eta: float, count: int, step: int, steps: int, job: Job | None
) -> dict[str, Any]:
    timestamp = time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_at)) if job else 0
    return {
        "progress": fraction,
        "eta_relative": eta,
        "state": {
            "skipped": False,
            "interrupted": False,
            "stopping_generation": False,
            "job": f"{job.endpoint} {job.id}" if job else "",
            "job_count": count,
            "job_timestamp": str(timestamp),
            "job_no": 0,
            "sampling_step": step,
            "sampling_steps": steps,
        },
        "current_image": None,
        "textinfo": None,
    }
