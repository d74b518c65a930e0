"""Turn the raw fields of a POST into the parameters a job runs with, or refuse them.

Pure: no I/O. Every refusal is an `ApiError` naming the field at fault, so a client learns
what to fix from one 400 instead of from a script that crashed after loading its model.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Final

from sd_rest.endpoints import ENDPOINTS
from sd_rest.errors import ApiError, invalid
from sd_rest.fields import (
    FIELDS,
    MAX_BATCH_SIZE,
    MAX_IMAGES,
    MAX_ITERATIONS,
    MAX_PIXELS,
    MAX_PROMPT_LENGTH,
    MAX_SEED,
    MAX_STEPS,
    MIN_PIXELS,
    MIN_STEPS,
    NumberField,
    Params,
    TextField,
)

__all__ = [  # the limits are the field table's; tests and clients find them here too
    "MAX_BATCH_SIZE",
    "MAX_IMAGES",
    "MAX_ITERATIONS",
    "MAX_PIXELS",
    "MAX_PROMPT_LENGTH",
    "MAX_SEED",
    "MAX_STEPS",
    "MIN_PIXELS",
    "Params",
    "ddim_step_crashes",
    "nearest_safe_steps",
    "validate_params",
]

# The DDIM schedule of the scripts is range(0, 1000, 1000 // steps) shifted by one.
DDIM_TIMESTEPS: Final = 1000

# Control characters a prompt may carry: they are ordinary text layout.
_ALLOWED_CONTROLS: Final = frozenset("\n\r\t")
_INT_TEXT: Final = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# Longer digit strings are out of every range; cut them off before int() does the work.
_MAX_DIGITS: Final = 30
_SHOWN_LENGTH: Final = 40


def ddim_step_crashes(steps: int) -> bool:
    """True when the scripts' DDIM sampler dies with IndexError for this many steps."""
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    stride = DDIM_TIMESTEPS // steps
    # A zero stride is a crash too: range() refuses a step of 0.
    return stride == 0 or (DDIM_TIMESTEPS - 1) % stride == 0


def nearest_safe_steps(steps: int) -> list[int]:
    """The accepted step counts closest to `steps` below and above it, within the limits.

    `[steps]` when `steps` itself is accepted.
    """
    if MIN_STEPS <= steps <= MAX_STEPS and not ddim_step_crashes(steps):
        return [steps]
    below = next(
        (
            s
            for s in range(min(steps - 1, MAX_STEPS), MIN_STEPS - 1, -1)
            if not ddim_step_crashes(s)
        ),
        None,
    )
    above = next(
        (s for s in range(max(steps + 1, MIN_STEPS), MAX_STEPS + 1) if not ddim_step_crashes(s)),
        None,
    )
    return [s for s in (below, above) if s is not None]


def validate_params(
    endpoint: str, fields: Sequence[tuple[str, object]], files: Sequence[str]
) -> Params:
    """Check the fields and file names of a request; return every parameter with defaults applied.

    `fields` are the non-file fields in arrival order (strings from forms, JSON values from a
    JSON body); `files` the names of the uploaded file parts. The result has exactly the keys
    of the endpoint's defaults, numbers as numbers; the prompt is returned verbatim.
    """
    spec = ENDPOINTS[endpoint]
    _check_names(endpoint, fields, files)
    given = dict(fields)
    params: Params = {}
    for name, default in spec.defaults.items():
        if name in given:
            params[name] = _parse_field(name, given[name])
        elif default is None:
            raise ApiError(400, "missing_field", f"{name} is required", name)
        else:
            params[name] = default
    _check_combinations(params)
    for name in spec.later:
        if params.get(name) == spec.defaults[name]:
            del params[name]  # see Endpoint.later: the id stays what it was before the field
    return params


def _check_names(endpoint: str, fields: Sequence[tuple[str, object]], files: Sequence[str]) -> None:
    spec = ENDPOINTS[endpoint]
    known = [*spec.defaults, *spec.files]
    unknown = [name for name, _ in fields if name not in known]
    unknown += [name for name in files if name not in spec.files and name not in spec.defaults]
    if unknown:
        unique = list(dict.fromkeys(unknown))
        raise ApiError(400, "unknown_field", _unknown_message(endpoint, unique, known), unique[0])
    for name, _ in fields:
        if name in spec.files:
            raise invalid(
                name, f"{name} must be a file upload (multipart/form-data), not a text field"
            )
    for name in files:
        if name in spec.defaults:
            raise invalid(name, f"{name} must be a text field, not a file upload")
    counts = Counter([*(name for name, _ in fields), *files])
    for name, count in counts.items():
        if count > 1:
            raise ApiError(
                400, "duplicate_field", f"{name} was given {count} times; send it once", name
            )
    for name in spec.files:
        if name not in files:
            raise ApiError(
                400,
                "missing_field",
                f"{name} is required: upload it as a file (multipart/form-data)",
                name,
            )


def _unknown_message(endpoint: str, names: Sequence[str], known: Sequence[str]) -> str:
    described = [f"{_shown(name)}{_unknown_hint(endpoint, name, known)}" for name in names]
    noun = "field" if len(names) == 1 else "fields"
    return f"unknown {noun} {', '.join(described)}; {endpoint} accepts: {', '.join(known)}"


def _unknown_hint(endpoint: str, name: str, known: Sequence[str]) -> str:
    if name in ENDPOINTS[endpoint].refused:
        return f" ({ENDPOINTS[endpoint].refused[name]})"
    elsewhere = [
        other.name for other in ENDPOINTS.values() if other.name != endpoint and other.takes(name)
    ]
    if elsewhere:
        return f" (only {' and '.join(elsewhere)} {'takes' if len(elsewhere) == 1 else 'take'} it)"
    by_lower = {k.lower(): k for k in known}
    # Bounded so that a megabyte-long name cannot make difflib crawl.
    close = difflib.get_close_matches(name[:100].lower(), list(by_lower), n=1)
    if close:
        return f' (did you mean "{by_lower[close[0]]}"?)'
    return ""


def _parse_field(name: str, value: object) -> int | float | str:
    spec = FIELDS[name]
    if isinstance(spec, TextField):
        return _check_prompt(name, value, spec.max_length)
    number = _number(name)  # files never reach here: _check_names sorts them out
    parsed = _parse_int(name, value) if number.kind is int else _parse_float(name, value, number)
    _check_range(name, parsed, number)
    return parsed


def _check_prompt(name: str, value: object, max_length: int) -> str:
    if not isinstance(value, str):
        raise invalid(name, f"{name} must be a string, got {_shown(value)}")
    if not value.strip():
        raise invalid(name, f"{name} must not be empty")
    if len(value) > max_length:
        raise invalid(name, f"{name} must be at most {max_length} characters, got {len(value)}")
    for position, char in enumerate(value):
        if (ord(char) < 0x20 and char not in _ALLOWED_CONTROLS) or ord(char) == 0x7F:
            raise invalid(
                name,
                f"{name} must not contain control characters (found U+{ord(char):04X} at "
                f"position {position}); only newline, carriage return and tab are allowed",
            )
        if 0xD800 <= ord(char) <= 0xDFFF:
            # It cannot be encoded to pass the prompt to the script.
            raise invalid(
                name,
                f"{name} must be valid Unicode text (found the unpaired surrogate "
                f"U+{ord(char):04X} at position {position})",
            )
    return value


def _number(name: str) -> NumberField:
    spec = FIELDS[name]
    assert isinstance(spec, NumberField)
    return spec


def _parse_int(name: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip()
        if _INT_TEXT.fullmatch(text):
            digits = text.lstrip("+-").lstrip("0")
            if len(digits) > _MAX_DIGITS:
                raise _range_error(name, _number(name), value)
            return int(text)
    raise invalid(name, f"{name} must be an integer, got {_shown(value)}")


def _parse_float(name: str, value: object, number: NumberField) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            parsed = float(value)
        except OverflowError:
            raise _range_error(name, number, value) from None
    elif isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        parsed = float(value.strip())
    else:
        raise invalid(name, f"{name} must be a number, got {_shown(value)}")
    if not math.isfinite(parsed):
        raise invalid(name, f"{name} must be a finite number, got {_shown(value)}")
    return parsed


def _check_range(name: str, value: float, number: NumberField) -> None:
    if number.open_interval:
        inside = number.low < value < number.high
    else:
        inside = number.low <= value <= number.high
    if not inside or (number.multiple != 1 and value % number.multiple != 0):
        raise _range_error(name, number, value)
    if name == "steps" and ddim_step_crashes(int(value)):
        nearest = " or ".join(str(s) for s in nearest_safe_steps(int(value)))
        raise invalid(
            name,
            f"steps={value} crashes the DDIM sampler of the Stable Diffusion scripts; "
            f"use {nearest}",
        )


def _range_error(name: str, number: NumberField, value: object) -> ApiError:
    if number.kind is int:
        low, high = str(int(number.low)), str(int(number.high))
    else:
        low, high = f"{number.low:g}", f"{number.high:g}"
    if number.open_interval:
        accepted = f"greater than {low} and less than {high}"
    elif number.multiple != 1:
        accepted = f"a multiple of {number.multiple} between {low} and {high}"
    else:
        accepted = f"between {low} and {high}"
    return invalid(name, f"{name} must be {accepted}, got {_shown(value)}")


def _check_combinations(params: Params) -> None:
    if "iterations" in params and "batchSize" in params:
        iterations, batch = int(params["iterations"]), int(params["batchSize"])
        if iterations * batch > MAX_IMAGES:
            raise invalid(
                "iterations",
                f"iterations × batchSize must be at most {MAX_IMAGES} images, "
                f"got {iterations} × {batch} = {iterations * batch}",
            )
    if "width" in params and "height" in params:
        width, height = int(params["width"]), int(params["height"])
        pixels = width * height
        if pixels < MIN_PIXELS:
            raise invalid(
                "width",
                f"width × height must be at least {MIN_PIXELS} pixels (256×256, the smallest "
                f"image the scripts' watermarking accepts), got {width}×{height} = {pixels}",
            )
        if pixels > MAX_PIXELS:
            raise invalid(
                "width",
                f"{width}×{height} = {pixels} pixels is too large for this server: "
                f"width × height must be at most {MAX_PIXELS} (1024×1024)",
            )
    if params.get("plms") and float(params.get("eta", 0)) != 0:
        # txt2img.py's PLMS sampler raises "ddim_eta must be 0 for PLMS" after the model load.
        raise invalid("eta", f"eta must be 0 with plms (PLMS takes no eta), got {params['eta']:g}")
    if "strength" in params and "steps" in params:
        strength, steps = float(params["strength"]), int(params["steps"])
        # The same product img2img.py computes: below 1 it samples zero steps.
        if int(strength * steps) < 1:
            raise invalid(
                "strength",
                f"strength × steps must be at least 1, got {strength:g} × {steps} "
                f"(the sampler would run zero steps); raise strength or steps",
            )


def _shown(value: object) -> str:
    """A short, JSON-like rendering of what the client sent, for error messages."""
    if isinstance(value, str):
        text = value if len(value) <= _SHOWN_LENGTH else value[:_SHOWN_LENGTH] + "…"
        return json.dumps(text, ensure_ascii=False)
    if value is None or isinstance(value, (bool, int, float)):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**_MAX_DIGITS:
            return "a very large number"
        return json.dumps(value)
    return f"a JSON {type(value).__name__.replace('dict', 'object').replace('list', 'array')}"
