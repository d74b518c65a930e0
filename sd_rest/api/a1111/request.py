"""Reading a `/sdapi/v1` body as AUTOMATIC1111's pydantic (v1) models do: each known field
coerced to its type (a numeric string is a number, 1 is true), null or absent meaning its
default, and every other field accepted and ignored. Pure.

Only the types are checked here; our ranges are the endpoints' own (translate.py)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from sd_rest.api.a1111.errors import invalid
from sd_rest.api.bodies import clip, load_json

_INT_TEXT: Final = re.compile(r"\s*[+-]?[0-9]{1,30}\s*")
_TRUE: Final = frozenset({"true", "1", "yes", "on", "y", "t"})
_FALSE: Final = frozenset({"false", "0", "no", "off", "n", "f"})


@dataclass(frozen=True)
class Spec:
    kind: type  # str, int, float, bool, list or dict
    default: Any
    items: type | None = None  # a list's: str (List[str] in its models), else anything


_COMMON: Final[dict[str, Spec]] = {
    "prompt": Spec(str, ""),
    "negative_prompt": Spec(str, ""),
    "styles": Spec(list, [], str),
    "seed": Spec(int, -1),
    "subseed": Spec(int, -1),
    "sampler_name": Spec(str, None),
    "sampler_index": Spec(str, None),
    "batch_size": Spec(int, 1),
    "n_iter": Spec(int, 1),
    "steps": Spec(int, 50),
    "cfg_scale": Spec(float, 7.0),
    "width": Spec(int, 512),
    "height": Spec(int, 512),
    "restore_faces": Spec(bool, None),
    "eta": Spec(float, None),
    "override_settings": Spec(dict, {}),
    "script_name": Spec(str, None),
    "alwayson_scripts": Spec(dict, {}),
    "send_images": Spec(bool, True),
    "save_images": Spec(bool, False),
}
TXT2IMG: Final[dict[str, Spec]] = {
    **_COMMON,
    "enable_hr": Spec(bool, False),
    "denoising_strength": Spec(float, None),  # the hires fix's, in txt2img
}
IMG2IMG: Final[dict[str, Spec]] = {
    **_COMMON,
    "init_images": Spec(list, None, str),
    "mask": Spec(str, None),
    "inpainting_mask_invert": Spec(int, 0),
    "resize_mode": Spec(int, 0),
    "denoising_strength": Spec(float, 0.75),
}


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a body, or FastAPI's 422 (our JSON limits: bodies.load_json)."""
    try:
        doc = load_json(raw)
    except ValueError as exc:
        position = getattr(exc, "pos", 0)
        message = f"JSON decode error: {clip(str(exc))}"
        raise invalid(["body", position], message, "value_error.jsondecode") from None
    if not isinstance(doc, dict):
        raise invalid(["body"], "value is not a valid dict", "type_error.dict")
    return doc


def read_fields(body: Mapping[str, Any], specs: Mapping[str, Spec]) -> dict[str, Any]:
    """Every field of `specs`, coerced or defaulted: the request after defaults, as
    AUTOMATIC1111 echoes it in `parameters`. Other fields are dropped, as its models drop
    them (SillyTavern's `auth` is never echoed back)."""
    return {name: _coerce(name, body.get(name), spec) for name, spec in specs.items()}


def sent_fields(body: Mapping[str, Any], specs: Mapping[str, Spec]) -> frozenset[str]:
    """The known fields the client gave a value (not null): what a note may name as not
    honoured, where a default would not be."""
    return frozenset(name for name in specs if body.get(name) is not None)


def _coerce(name: str, value: Any, spec: Spec) -> Any:
    if value is None:
        return spec.default
    kind = spec.kind
    if kind is int:
        return _int(name, value)
    if kind is float:
        return _float(name, value)
    if kind is bool:
        return _bool(name, value)
    if kind is str:
        return _str(["body", name], value)
    if not isinstance(value, kind):
        noun = "list" if kind is list else "dict"
        raise invalid(["body", name], f"value is not a valid {noun}", f"type_error.{noun}")
    if spec.items is str:
        return [_str(["body", name, n], item) for n, item in enumerate(value)]
    return value


def _str(loc: list[str | int], value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return str(value)
        except ValueError:  # an int too long for Python to write out
            pass
    raise invalid(loc, "str type expected", "type_error.str")


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT_TEXT.fullmatch(value):
        return int(value)
    raise invalid(["body", name], "value is not a valid integer", "type_error.integer")


def _float(name: str, value: Any) -> float:
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
    elif isinstance(value, str):
        try:
            number = float(value.strip()[:40])
        except ValueError:
            raise invalid(
                ["body", name], "value is not a valid float", "type_error.float"
            ) from None
    else:
        raise invalid(["body", name], "value is not a valid float", "type_error.float")
    if not math.isfinite(number):
        raise invalid(["body", name], "value is not a finite number", "value_error.number")
    return number


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise invalid(["body", name], "value could not be parsed to a boolean", "type_error.bool")
