"""An AUTOMATIC1111 request into one of our jobs: the endpoint, its fields (checked by our own
validation, so both APIs accept exactly the same values), the uploads, and the notes naming
what the scripts cannot do. Pure: the random seed is passed in, the images come decoded
(images.py), and nothing is written.

What maps where: prompt, steps, cfg_scale → guidanceScale, seed (-1: the random one passed in),
width, height, batch_size → batchSize, n_iter → iterations, eta, denoising_strength →
strength (img2img), sampler PLMS → plms (txt2img only), init_images[0] → the image, mask →
inpaint-image (which takes steps and seed only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sd_rest.api.a1111.errors import DialectError, failure, invalid
from sd_rest.api.a1111.images import decode_base64, resized_image, resized_mask
from sd_rest.api.validation import validate_params
from sd_rest.endpoints import IMAGE_TO_IMAGE, INPAINT_IMAGE, TEXT_TO_IMAGE
from sd_rest.errors import ApiError
from sd_rest.fields import Params

DDIM: Final = "DDIM"
PLMS: Final = "PLMS"
# Our field -> AUTOMATIC1111's, to name the field at fault in a 422.
THEIR_NAMES: Final = {
    "prompt": "prompt",
    "iterations": "n_iter",
    "batchSize": "batch_size",
    "steps": "steps",
    "seed": "seed",
    "width": "width",
    "height": "height",
    "guidanceScale": "cfg_scale",
    "eta": "eta",
    "strength": "denoising_strength",
    "plms": "sampler_name",
    "image": "init_images",
    "mask": "mask",
}


@dataclass(frozen=True)
class Plan:
    endpoint: str
    params: Params
    uploads: dict[str, bytes]  # what the endpoint's prepare_inputs takes
    notes: tuple[str, ...]
    sampler: str  # what runs: DDIM or PLMS
    seed: int


def refuse_scripts(request: Mapping[str, Any]) -> None:
    """AUTOMATIC1111 answers 422 for a script it does not have; we have none."""
    name = request.get("script_name")
    if name:
        raise failure(422, f"Script '{name}' not found")
    for script in request.get("alwayson_scripts") or {}:
        raise failure(422, f"always on script {script} not found")


def sampler_asked(request: Mapping[str, Any]) -> str | None:
    return request.get("sampler_name") or request.get("sampler_index") or None


def plan_txt2img(request: Mapping[str, Any], random_seed: int) -> Plan:
    refuse_scripts(request)
    notes = _common_notes(request)
    sampler, eta = _sampler(request, notes, plms_possible=True)
    if request.get("enable_hr"):
        notes.append("hires fix (enable_hr)")
    seed = _seed(request, random_seed)
    fields = [
        ("prompt", request["prompt"]),
        ("iterations", request["n_iter"]),
        ("batchSize", request["batch_size"]),
        ("steps", request["steps"]),
        ("seed", seed),
        ("width", request["width"]),
        ("height", request["height"]),
        ("guidanceScale", request["cfg_scale"]),
        ("eta", eta),
        ("plms", 1 if sampler == PLMS else 0),
    ]
    params = _validated(TEXT_TO_IMAGE, fields)
    return Plan(TEXT_TO_IMAGE, params, {}, tuple(notes), sampler, seed)


def plan_img2img(request: Mapping[str, Any], random_seed: int) -> Plan:
    """Decodes and resizes the images: run it in a thread."""
    refuse_scripts(request)
    notes = _common_notes(request)
    images = request.get("init_images")
    if not images:
        raise failure(404, "Init image not found")
    if not isinstance(images[0], str):
        raise invalid(["body", "init_images", 0], "str type expected", "type_error.str")
    size = _size(request)
    seed = _seed(request, random_seed)
    if request.get("resize_mode"):
        notes.append(f"resize mode {request['resize_mode']} (ran 0, just resize)")
    image = resized_image(
        ["body", "init_images", 0], decode_base64(["body", "init_images", 0], images[0]), size
    )
    if request.get("mask"):
        return _inpaint(request, notes, image, size, seed)
    sampler, eta = _sampler(request, notes, plms_possible=False)
    fields = [
        ("prompt", request["prompt"]),
        ("iterations", request["n_iter"]),
        ("batchSize", request["batch_size"]),
        ("steps", request["steps"]),
        ("seed", seed),
        ("guidanceScale", request["cfg_scale"]),
        ("eta", eta),
        ("strength", request["denoising_strength"]),
    ]
    params = _validated(IMAGE_TO_IMAGE, fields, ["image"])
    return Plan(IMAGE_TO_IMAGE, params, {"image": image}, tuple(notes), sampler, seed)


def _inpaint(
    request: Mapping[str, Any], notes: list[str], image: bytes, size: tuple[int, int], seed: int
) -> Plan:
    mask = resized_mask(
        ["body", "mask"],
        decode_base64(["body", "mask"], request["mask"]),
        size,
        invert=bool(request.get("inpainting_mask_invert")),
    )
    if str(request.get("prompt") or "").strip():
        notes.append("prompt (the inpaint model takes none)")
    total = request["batch_size"] * request["n_iter"]
    if total > 1:
        notes.append(f"batch_size × n_iter = {total} (inpainting makes one image)")
    asked = sampler_asked(request)
    if asked and asked.upper() != DDIM:
        notes.append(f"sampler {asked} (ran DDIM)")
    params = _validated(
        INPAINT_IMAGE, [("steps", request["steps"]), ("seed", seed)], ["image", "mask"]
    )
    return Plan(INPAINT_IMAGE, params, {"image": image, "mask": mask}, tuple(notes), DDIM, seed)


def _common_notes(request: Mapping[str, Any]) -> list[str]:
    notes: list[str] = []
    negative = str(request.get("negative_prompt") or "")
    if negative.strip():
        notes.append(f"negative prompt {_clip(negative)} (the scripts take none)")
    if request.get("restore_faces"):
        notes.append("face restoration (restore_faces)")
    styles = [str(style) for style in request.get("styles") or []]
    if styles:
        notes.append(f"styles {', '.join(_clip(style) for style in styles)}")
    return notes


def _sampler(
    request: Mapping[str, Any], notes: list[str], plms_possible: bool
) -> tuple[str, float]:
    """(the sampler that runs, its eta)."""
    asked = sampler_asked(request)
    eta = float(request.get("eta") or 0.0)
    if asked is None or asked.upper() == DDIM:
        return DDIM, eta
    if asked.upper() == PLMS and plms_possible:
        if eta:
            notes.append(f"eta {eta:g} (PLMS takes none: ran 0)")
        return PLMS, 0.0
    where = " (img2img.py has no PLMS)" if asked.upper() == PLMS else ""
    notes.append(f"sampler {_clip(asked)}{where} (ran DDIM)")
    return DDIM, eta


def _seed(request: Mapping[str, Any], random_seed: int) -> int:
    seed = int(request["seed"])
    return random_seed if seed == -1 else seed


def _size(request: Mapping[str, Any]) -> tuple[int, int]:
    """width × height as text-to-image accepts them: the size every image is resized to."""
    _validated(
        TEXT_TO_IMAGE,
        [("prompt", "size"), ("width", request["width"]), ("height", request["height"])],
    )
    return int(request["width"]), int(request["height"])


def _validated(
    endpoint: str, fields: Sequence[tuple[str, object]], files: Sequence[str] = ()
) -> Params:
    try:
        return validate_params(endpoint, fields, files)
    except ApiError as error:
        raise as_422(error) from None


def as_422(error: ApiError) -> DialectError:
    """Our validation's refusal as FastAPI's 422, the field named as AUTOMATIC1111 names it."""
    name = THEIR_NAMES.get(error.field or "", error.field or "body")
    loc: list[str | int] = ["body", name] if name != "body" else ["body"]
    return invalid(loc, error.message)


def _clip(text: str) -> str:
    shown = text if len(text) <= 60 else text[:60] + "…"
    return '"' + shown.replace("\n", " ") + '"'
