"""The dialect's part of /openapi.json: its operations and their schemas, which api/openapi.py
adds to the document beside our own (with the errors every request can get). Pure data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from sd_rest.api.a1111.catalog import GET_LISTS, PREFIX
from sd_rest.api.a1111.request import IMG2IMG, TXT2IMG, Spec

TAG: Final = "AUTOMATIC1111"
_TYPES: Final = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    dict: "object",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _body(specs: Mapping[str, Spec], description: str) -> dict[str, Any]:
    properties = {
        name: {
            "type": [_TYPES[spec.kind], "null"],
            **({"default": spec.default} if spec.default is not None else {}),
        }
        for name, spec in specs.items()
    }
    return {
        "type": "object",
        "properties": properties,
        "additionalProperties": True,
        "description": description,
    }


SCHEMAS: Final[dict[str, Any]] = {
    "A1111Error": {
        "type": "object",
        "description": "AUTOMATIC1111's own error shape.",
        "properties": {
            "error": {"type": "string"},
            "detail": {"type": "string"},
            "body": {"type": "string"},
            "errors": {"type": "string"},
        },
        "required": ["error", "detail", "body", "errors"],
    },
    "A1111ValidationError": {
        "type": "object",
        "description": "FastAPI's 422: the value at `loc` was refused.",
        "properties": {
            "detail": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                        "msg": {"type": "string"},
                        "type": {"type": "string"},
                    },
                    "required": ["loc", "msg", "type"],
                },
            }
        },
        "required": ["detail"],
    },
    "A1111Txt2Img": _body(
        TXT2IMG,
        "AUTOMATIC1111's txt2img request. Honoured: prompt, steps, cfg_scale, seed (-1: "
        "random), width, height, batch_size, n_iter, eta, sampler_name/sampler_index (DDIM; "
        "PLMS runs txt2img.py with --plms), override_settings.sd_model_checkpoint, send_images. "
        "Named as not honoured (in info and the infotext): negative_prompt, another sampler "
        "(DDIM runs), enable_hr, restore_faces, styles. Refused (422): script_name, a non-empty "
        "alwayson_scripts. Any other field (save_images too) is ignored and not echoed in "
        "`parameters`. The ranges are POST /text-to-image's; an empty prompt is a 422.",
    ),
    "A1111Img2Img": _body(
        IMG2IMG,
        "AUTOMATIC1111's img2img request: as txt2img, plus init_images[0] (base64, raw or a "
        "data: URL; resized to width × height, 'just resize'), denoising_strength (strictly "
        "between 0 and 1) and mask (then the inpaint script runs: white repaints, "
        "inpainting_mask_invert honoured; every value is still checked as image-to-image "
        "checks it, but denoising_strength 1 is accepted; it takes steps and seed only, and a "
        "prompt, a batch, and a cfg_scale, denoising_strength or eta sent are named as not "
        "honoured; info.cfg_scale is null).",
    ),
    "A1111Generation": {
        "type": "object",
        "properties": {
            "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}},
            "parameters": {"type": "object"},
            "info": {"type": "string", "description": "JSON: what made the images."},
        },
        "required": ["images", "parameters", "info"],
    },
    "A1111Progress": {
        "type": "object",
        "properties": {
            "progress": {"type": "number", "minimum": 0, "maximum": 1},
            "eta_relative": {"type": "number"},
            "state": {
                "type": "object",
                "properties": {
                    "job_count": {"type": "integer", "minimum": 0},
                    "sampling_step": {"type": "integer", "minimum": 0},
                    "sampling_steps": {"type": "integer", "minimum": 0},
                },
                "required": ["job_count", "sampling_step", "sampling_steps"],
            },
        },
        "required": ["progress", "eta_relative", "state"],
    },
    "A1111Model": {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "model_name": {"type": "string"},
            "hash": {"type": ["string", "null"]},
            "sha256": {"type": ["string", "null"]},
            "filename": {"type": "string"},
            "config": {"type": ["string", "null"]},
        },
        "required": ["title", "model_name", "hash", "sha256", "filename", "config"],
    },
}


def _errors(*statuses: int) -> dict[str, Any]:
    shapes = {
        "422": {"anyOf": [_ref("A1111ValidationError"), _ref("A1111Error")]},
    }
    return {
        str(status): {
            "description": "Refused, in AUTOMATIC1111's shapes.",
            "content": {
                "application/json": {"schema": shapes.get(str(status), _ref("A1111Error"))}
            },
        }
        for status in statuses
    }


def _ok(schema: Any, description: str) -> dict[str, Any]:
    return {
        "200": {"description": description, "content": {"application/json": {"schema": schema}}}
    }


def _generation(name: str, schema: str, summary: str) -> dict[str, Any]:
    return {
        "operationId": f"a1111{name}",
        "summary": summary,
        "description": "Waits for its job (an ordinary sd-rest job: listed, streamed, same "
        "id as the same settings through our own API) and answers its images as base64 PNGs. "
        "A client that goes away does not cancel it; POST /sdapi/v1/interrupt does. A job "
        "interrupted answers the images it had.",
        "tags": [TAG],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref(schema)}},
        },
        "responses": {
            **_ok(_ref("A1111Generation"), "The job's images, parameters and info."),
            **_errors(404, 408, 422, 429, 503, 507),
        },
    }


def operations() -> list[tuple[str, str, dict[str, Any], bool]]:
    """(path, method, operation, with a HEAD) of every route of the dialect."""
    listing = {"type": "array", "items": {"type": "object"}}
    ops: list[tuple[str, str, dict[str, Any], bool]] = [
        (
            f"{PREFIX}/txt2img",
            "post",
            _generation("Txt2Img", "A1111Txt2Img", "Text to image"),
            False,
        ),
        (
            f"{PREFIX}/img2img",
            "post",
            _generation("Img2Img", "A1111Img2Img", "Image to image, or inpaint with a mask"),
            False,
        ),
        (
            f"{PREFIX}/options",
            "get",
            {
                "operationId": "a1111GetOptions",
                "summary": "Options: sd_model_checkpoint, sd_checkpoint_hash, samples_format…",
                "tags": [TAG],
                "responses": _ok({"type": "object"}, "The options."),
            },
            True,
        ),
        (
            f"{PREFIX}/options",
            "post",
            {
                "operationId": "a1111SetOptions",
                "summary": "Set options: the whole dict read back is accepted",
                "description": "sd_model_checkpoint must name our text-to-image checkpoint "
                "(its title, name or hash); every other option is accepted and ignored.",
                "tags": [TAG],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {**_ok({"const": True}, "Taken."), **_errors(408, 422)},
            },
            False,
        ),
        (
            f"{PREFIX}/sd-models",
            "get",
            {
                "operationId": "a1111GetModels",
                "summary": "The checkpoint to choose: the text-to-image model",
                "tags": [TAG],
                "responses": _ok({"type": "array", "items": _ref("A1111Model")}, "The models."),
            },
            True,
        ),
        (
            f"{PREFIX}/progress",
            "get",
            {
                "operationId": "a1111GetProgress",
                "summary": "Progress of the running job; idle: progress 0 and job_count 0",
                "tags": [TAG],
                "responses": _ok(_ref("A1111Progress"), "The progress."),
            },
            True,
        ),
    ]
    for path, name in (("interrupt", "Interrupt"), ("skip", "Skip")):
        ops.append(
            (
                f"{PREFIX}/{path}",
                "post",
                {
                    "operationId": f"a1111{name}",
                    "summary": "Cancel the jobs running for AUTOMATIC1111's callers",
                    "tags": [TAG],
                    "responses": _ok({"type": "object"}, "Done."),
                },
                False,
            )
        )
    for path in GET_LISTS:
        ops.append(
            (
                f"{PREFIX}{path}",
                "get",
                {
                    "operationId": "a1111Get" + path.strip("/").title().replace("-", ""),
                    "summary": f"AUTOMATIC1111's {path.strip('/')} list: what sd-rest has",
                    "tags": [TAG],
                    "responses": _ok(
                        {"type": "object"} if path == "/scripts" else listing, "The list."
                    ),
                },
                True,
            )
        )
    ops.append(
        (
            "/internal/ping",
            "get",
            {
                "operationId": "a1111Ping",
                "summary": "AUTOMATIC1111's liveness ping",
                "tags": [TAG],
                "responses": _ok({"type": "object"}, "Alive."),
            },
            True,
        )
    )
    return ops
