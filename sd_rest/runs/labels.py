"""What each published PNG says about how it was made: a `parameters` chunk in AUTOMATIC1111's
infotext format (read by its PNG Info, ComfyUI and InvokeAI) and an `sd-rest` chunk of JSON
with everything needed to make the image again.

`describe_run` and `image_texts` are pure; `ImageLabeler` adds what only the moment of
publication knows (the checkpoint's digest, if learnt by then: provenance.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sd_rest import __version__
from sd_rest.endpoints import ENDPOINTS
from sd_rest.fields import Params
from sd_rest.images.pngfile import png_size
from sd_rest.images.pngmeta import Setting, add_text_chunks, infotext
from sd_rest.runs.provenance import Provenance
from sd_rest.scripts import RunFolders, RunPlan
from sd_rest.state.jobs import Job

PARAMETERS_KEYWORD: Final = "parameters"  # AUTOMATIC1111's
SD_REST_KEYWORD: Final = "sd-rest"
FORMAT_VERSION: Final = 1
SAMPLER: Final = "DDIM"  # all three scripts sample with DDIM (txt2img.py without --plms)
PLMS: Final = "PLMS"  # txt2img.py with --plms
NOT_HONOURED: Final = "Not honoured"  # sd-rest's own key: what a request asked in vain
MODEL_HASH_LENGTH: Final = 10  # AUTOMATIC1111's short hash: the SHA-256's first 10 hex digits

# What the run's own paths read as in the recorded flags: they are of no use elsewhere, and a
# published image should not carry the server's folder names.
OUTDIR: Final = "{outdir}"
CHECKPOINT: Final = "{checkpoint}"
INPUTS: Final = "{inputs}"
_PLACEHOLDER_FOLDERS: Final = RunFolders(
    root=Path("{run}"), outdir=Path(OUTDIR), images=Path(OUTDIR), cwd=Path("{cwd}")
)


@dataclass(frozen=True)
class RunDescription:
    """What every image of one run shares."""

    endpoint: str
    job_id: str
    params: Params
    uploads: dict[str, str]  # field -> SHA-256 of the bytes the client sent
    script: str
    flags: list[str]
    torch_seed: int | None  # inpaint.py: torch.manual_seed at start instead of a flag
    run_seed: int
    run_images: int  # images this run makes
    checkpoint: str  # the file's name
    notes: tuple[str, ...] = ()  # what the request asked that the scripts cannot do


def describe_run(job: Job, plan: RunPlan) -> RunDescription:
    """The run's flags come from the endpoint's own `arguments`, the function that makes the
    real argv, with placeholders for the run's paths: the two cannot drift."""
    endpoint = ENDPOINTS[job.endpoint]
    flags = endpoint.arguments(
        job.params, plan, _PLACEHOLDER_FOLDERS, Path(CHECKPOINT), Path(INPUTS)
    )
    return RunDescription(
        endpoint=job.endpoint,
        job_id=job.id,
        params=dict(job.params),
        uploads=dict(job.uploads),
        script=endpoint.script,
        flags=flags,
        torch_seed=endpoint.start_seed(plan),
        run_seed=plan.seed,
        run_images=plan.remaining,
        checkpoint=Path(job.checkpoint).name,
        notes=job.notes,
    )


def _settings(
    run: RunDescription, position: int, size: tuple[int, int], sha: str | None
) -> list[Setting]:
    params = run.params
    batch = int(params.get("batchSize", 1))
    guidance = params.get("guidanceScale")
    eta = params.get("eta")
    return [
        ("Steps", int(params["steps"])),
        ("Sampler", PLMS if params.get("plms") else SAMPLER),
        ("CFG scale", None if guidance is None else float(guidance)),
        ("Seed", run.run_seed),
        ("Size", f"{size[0]}x{size[1]}"),
        ("Model hash", sha[:MODEL_HASH_LENGTH] if sha else None),
        ("Model", Path(run.checkpoint).stem),
        ("Denoising strength", None if "strength" not in params else float(params["strength"])),
        ("Eta DDIM", float(eta) if eta else None),  # like AUTOMATIC1111: only when not 0
        ("Batch size", batch if batch > 1 else None),
        ("Batch pos", (position - 1) % batch if batch > 1 else None),
        # Not one of AUTOMATIC1111's: the scripts seed once per run, so an image is found
        # again by its run's seed and its place in that run.
        ("Position in run", position if run.run_images > 1 else None),
        (NOT_HONOURED, "; ".join(run.notes) if run.notes else None),
    ]


def image_texts(
    run: RunDescription,
    number: int,
    position: int,
    size: tuple[int, int],
    checkpoint_sha256: str | None,
    fork_commit: str | None,
) -> list[tuple[str, str]]:
    """The two text chunks of image `number`, the run's `position`-th: (keyword, text)."""
    prompt = run.params.get("prompt")
    parameters = infotext(
        None if prompt is None else str(prompt),
        _settings(run, position, size, checkpoint_sha256),
    )
    doc: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "server": {"name": "sd-rest", "version": __version__},
        "endpoint": run.endpoint,
        "job": run.job_id,
        "image": {"number": number, "seed": run.run_seed, "position": position},
        "request": run.params,
        "uploads": run.uploads,
        "script": {"path": run.script, "flags": run.flags, "torchSeed": run.torch_seed},
        "checkpoint": {"name": run.checkpoint, "sha256": checkpoint_sha256},
        "fork": {"commit": fork_commit},
    }
    return [
        (PARAMETERS_KEYWORD, parameters),
        (SD_REST_KEYWORD, json.dumps(doc, ensure_ascii=False, separators=(",", ":"))),
    ]


class ImageLabeler:
    """Adds the two chunks to each image of one run (called in the publisher's thread)."""

    def __init__(self, run: RunDescription, checkpoint: Path, provenance: Provenance) -> None:
        self.run = run
        self.checkpoint = checkpoint
        self.provenance = provenance

    def __call__(self, png: bytes, number: int, position: int) -> bytes:
        texts = image_texts(
            self.run,
            number,
            position,
            png_size(png),
            self.provenance.checkpoint_sha256(self.checkpoint),
            self.provenance.fork_commit(),
        )
        return add_text_chunks(png, texts)
