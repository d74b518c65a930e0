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
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Final

from sd_rest.api.a1111.errors import DialectError, failure, invalid
from sd_rest.api.a1111.images import decode_base64, resized_image, resized_mask
from sd_rest.api.bodies import clip
from sd_rest.api.validation import validate_params
from sd_rest.endpoints import IMAGE_TO_IMAGE, INPAINT_IMAGE, TEXT_TO_IMAGE
from sd_rest.errors import ApiError
from sd_rest.fields import Params

DDIM: Final = "DDIM"
PLMS: Final = "PLMS"
# What inpaint.py runs with, whatever is asked: no classifier-free guidance (a scale of 1),
# the masked area repainted whole.
INPAINT_GUIDANCE: Final = 1.0
INPAINT_STRENGTH: Final = 1.0
# Notes are read by people (a client's info, the log): bounded, however much was sent.
CLIPPED: Final = 60  # characters of a client's text quoted in a note
SHOWN_STYLES: Final = 5
CLIPPED_STYLE: Final = 30
MAX_NOTE: Final = 300
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
        raise failure(422, f"Script '{clip(name)}' not found")
    for script in request.get("alwayson_scripts") or {}:
        raise failure(422, f"always on script {clip(str(script))} not found")


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
    return Plan(TEXT_TO_IMAGE, params, {}, _capped(notes), sampler, seed)


def plan_img2img(
    request: Mapping[str, Any], random_seed: int, sent: AbstractSet[str] = frozenset()
) -> Plan:
    """Decodes and resizes the images: run it in a thread. `sent`: the fields the client gave
    (request.sent_fields), which a mask's notes name when inpainting cannot use them.

    Every value is checked as image-to-image checks it, with a mask too: a value refused
    without one is refused with one (but strength 1, which is what inpainting does)."""
    refuse_scripts(request)
    notes = _common_notes(request)
    images = request.get("init_images")
    if not images:
        raise failure(404, "Init image not found")
    size = _size(request)
    seed = _seed(request, random_seed)
    masked = bool(request.get("mask"))
    sampler_notes: list[str] = []
    sampler, eta = _sampler(request, sampler_notes, plms_possible=False)
    strength = request["denoising_strength"]
    fields = [
        ("prompt", "unused" if masked else request["prompt"]),  # inpainting takes none
        ("iterations", request["n_iter"]),
        ("batchSize", request["batch_size"]),
        ("steps", request["steps"]),
        ("seed", seed),
        ("guidanceScale", request["cfg_scale"]),
        ("eta", eta),
        *([] if masked and strength == INPAINT_STRENGTH else [("strength", strength)]),
    ]
    params = _validated(IMAGE_TO_IMAGE, fields, ["image"])
    if request.get("resize_mode"):
        notes.append(f"resize mode {request['resize_mode']} (ran 0, just resize)")
    image = resized_image(
        ["body", "init_images", 0], decode_base64(["body", "init_images", 0], images[0]), size
    )
    if masked:
        return _inpaint(request, notes + _inpaint_notes(request, sent), image, size, seed)
    notes += sampler_notes
    return Plan(IMAGE_TO_IMAGE, params, {"image": image}, _capped(notes), sampler, seed)


def _inpaint(
    request: Mapping[str, Any], notes: list[str], image: bytes, size: tuple[int, int], seed: int
) -> Plan:
    mask = resized_mask(
        ["body", "mask"],
        decode_base64(["body", "mask"], request["mask"]),
        size,
        invert=bool(request.get("inpainting_mask_invert")),
    )
    params = _validated(
        INPAINT_IMAGE, [("steps", request["steps"]), ("seed", seed)], ["image", "mask"]
    )
    return Plan(INPAINT_IMAGE, params, {"image": image, "mask": mask}, _capped(notes), DDIM, seed)


def _inpaint_notes(request: Mapping[str, Any], sent: AbstractSet[str]) -> list[str]:
    """What inpaint.py cannot use, of what was sent (checked already): it samples one image
    with DDIM, eta 0 and no guidance, repainting the whole mask, from no prompt."""
    notes: list[str] = []
    if str(request.get("prompt") or "").strip():
        notes.append("prompt (the inpaint model takes none)")
    total = request["batch_size"] * request["n_iter"]
    if total > 1:
        notes.append(f"batch_size × n_iter = {total} (inpainting makes one image)")
    asked = sampler_asked(request)
    if asked and asked.upper() != DDIM:
        notes.append(f"sampler {_clip(asked)} (ran DDIM)")
    if "cfg_scale" in sent and request["cfg_scale"] != INPAINT_GUIDANCE:
        notes.append(f"cfg_scale {request['cfg_scale']:g} (inpainting runs without guidance)")
    strength = request["denoising_strength"]
    if "denoising_strength" in sent and strength != INPAINT_STRENGTH:
        notes.append(f"denoising_strength {strength:g} (inpainting repaints the mask whole: ran 1)")
    if "eta" in sent and request["eta"]:
        notes.append(f"eta {request['eta']:g} (inpainting runs 0)")
    return notes


def _common_notes(request: Mapping[str, Any]) -> list[str]:
    notes: list[str] = []
    negative = str(request.get("negative_prompt") or "")
    if negative.strip():
        notes.append(f"negative prompt {_clip(negative)} (the scripts take none)")
    if request.get("restore_faces"):
        notes.append("face restoration (restore_faces)")
    styles = [str(style) for style in request.get("styles") or []]
    if styles:
        shown = ", ".join(_clip(style, CLIPPED_STYLE) for style in styles[:SHOWN_STYLES])
        more = len(styles) - SHOWN_STYLES
        notes.append(f"styles {shown}" + (f" and {more} more" if more > 0 else ""))
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


def _clip(text: str, length: int = CLIPPED) -> str:
    shown = text if len(text) <= length else text[:length] + "…"
    return '"' + shown.replace("\n", " ") + '"'


def _capped(notes: Sequence[str]) -> tuple[str, ...]:
    return tuple(note if len(note) <= MAX_NOTE else note[: MAX_NOTE - 1] + "…" for note in notes)
