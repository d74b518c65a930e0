"""The three endpoints: their script, their fields and the defaults the original applied."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

TEXT_TO_IMAGE: Final = "text-to-image"
IMAGE_TO_IMAGE: Final = "image-to-image"
INPAINT_IMAGE: Final = "inpaint-image"


@dataclass(frozen=True)
class Endpoint:
    name: str
    script: str  # path inside the Stable Diffusion repository
    defaults: dict[str, int | float | str | None]  # None: required, no default
    files: tuple[str, ...]  # required uploads
    model: str  # which checkpoint setting it runs on: "text-to-image" or "inpaint-image"


ENDPOINTS: Final[dict[str, Endpoint]] = {
    TEXT_TO_IMAGE: Endpoint(
        name=TEXT_TO_IMAGE,
        script="scripts/txt2img.py",
        defaults={
            "prompt": None,
            "iterations": 1,
            "batchSize": 1,
            "steps": 8,
            "seed": 42,
            "width": 512,
            "height": 512,
            "guidanceScale": 7.5,
            "eta": 0.0,
        },
        files=(),
        model=TEXT_TO_IMAGE,
    ),
    IMAGE_TO_IMAGE: Endpoint(
        name=IMAGE_TO_IMAGE,
        script="scripts/img2img.py",
        defaults={
            "prompt": None,
            "iterations": 1,
            "batchSize": 1,
            "steps": 24,
            "seed": 42,
            "guidanceScale": 7.5,
            "eta": 0.0,
            "strength": 0.75,
        },
        files=("image",),
        model=TEXT_TO_IMAGE,
    ),
    INPAINT_IMAGE: Endpoint(
        name=INPAINT_IMAGE,
        script="scripts/inpaint.py",
        defaults={"steps": 32, "seed": 42},
        files=("image", "mask"),
        model=INPAINT_IMAGE,
    ),
}


def total_images(params: dict[str, int | float | str]) -> int:
    """iterations × batchSize; inpaint always makes exactly one image."""
    return int(params.get("iterations", 1)) * int(params.get("batchSize", 1))
