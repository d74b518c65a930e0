"""The request fields: their types, ranges and meaning. One table, read by validation (what is
accepted), the endpoints (which fields each takes, with its own defaults) and the API
description, so that none of them can drift from the others."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MAX_ITERATIONS: Final = 50
MAX_BATCH_SIZE: Final = 8
MAX_IMAGES: Final = 100  # iterations × batchSize of one job
MIN_STEPS: Final = 1
MAX_STEPS: Final = 250
MAX_SEED: Final = 2**32 - 1  # the scripts seed numpy, which takes 32-bit seeds
MAX_PROMPT_LENGTH: Final = 1000  # characters
SIZE_MULTIPLE: Final = 64
MIN_SIDE: Final = 64
MAX_SIDE: Final = 2048
MIN_PIXELS: Final = 256 * 256  # the scripts' invisible watermark refuses anything smaller
MAX_PIXELS: Final = 1024 * 1024
MAX_GUIDANCE_SCALE: Final = 50.0
MAX_ETA: Final = 1.0


@dataclass(frozen=True)
class NumberField:
    name: str
    kind: type[int] | type[float]
    low: float
    high: float
    description: str
    open_interval: bool = False  # both bounds excluded
    multiple: int = 1


@dataclass(frozen=True)
class TextField:
    name: str
    max_length: int
    description: str


@dataclass(frozen=True)
class FileField:
    name: str
    description: str


Field = NumberField | TextField | FileField

FIELDS: Final[dict[str, Field]] = {
    field.name: field
    for field in (
        TextField(
            "prompt",
            MAX_PROMPT_LENGTH,
            "What to draw: not blank, no control characters but tab and newline.",
        ),
        NumberField(
            "iterations",
            int,
            1,
            MAX_ITERATIONS,
            "How many times the script samples a batch (its --n_iter); images = iterations × "
            f"batchSize, at most {MAX_IMAGES}.",
        ),
        NumberField(
            "batchSize",
            int,
            1,
            MAX_BATCH_SIZE,
            "Images made together in one batch (--n_samples).",
        ),
        NumberField(
            "steps",
            int,
            MIN_STEPS,
            MAX_STEPS,
            "Sampler steps (--ddim_steps); the values that crash the scripts' DDIM sampler "
            "(those where 999 is a multiple of 1000 // steps: 3, 9, 27, 36, 37, 101-111) are "
            "refused.",
        ),
        NumberField(
            "seed",
            int,
            0,
            MAX_SEED,
            "Seed of the run (--seed); image k of a resumed job is made by seed + done.",
        ),
        NumberField(
            "width",
            int,
            MIN_SIDE,
            MAX_SIDE,
            "Image width in pixels (--W); width × height between 256×256 and 1024×1024.",
            multiple=SIZE_MULTIPLE,
        ),
        NumberField(
            "height",
            int,
            MIN_SIDE,
            MAX_SIDE,
            "Image height in pixels (--H); width × height between 256×256 and 1024×1024.",
            multiple=SIZE_MULTIPLE,
        ),
        NumberField(
            "guidanceScale",
            float,
            0.0,
            MAX_GUIDANCE_SCALE,
            "Classifier-free guidance scale (--scale).",
        ),
        NumberField("eta", float, 0.0, MAX_ETA, "DDIM eta (--ddim_eta); 0 is deterministic."),
        NumberField(
            "plms",
            int,
            0,
            1,
            "1: sample with PLMS (txt2img.py's --plms) instead of DDIM; eta must then be 0.",
        ),
        NumberField(
            "strength",
            float,
            0.0,
            1.0,
            "How much of the image is noised before sampling (--strength); strength × steps "
            "must be at least 1.",
            open_interval=True,
        ),
        FileField("image", "A PNG, JPEG or WebP image, decided by decoding it."),
        FileField("mask", "A PNG, JPEG or WebP mask, white where the image is repainted."),
    )
}

# A job's parameters once validated: every field of its endpoint, numbers as numbers.
Params = dict[str, int | float | str]
