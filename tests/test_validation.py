"""Request validation: every bad input is one clear 400 naming its field."""

from __future__ import annotations

import pytest

from sd_rest.api.validation import (
    MAX_BATCH_SIZE,
    MAX_IMAGES,
    MAX_ITERATIONS,
    MAX_PIXELS,
    MAX_PROMPT_LENGTH,
    MAX_SEED,
    MAX_STEPS,
    MIN_PIXELS,
    ddim_step_crashes,
    nearest_safe_steps,
    validate_params,
)
from sd_rest.endpoints import ENDPOINTS, IMAGE_TO_IMAGE, INPAINT_IMAGE, TEXT_TO_IMAGE
from sd_rest.errors import ApiError

FILES = {name: list(endpoint.files) for name, endpoint in ENDPOINTS.items()}
PROMPT = {TEXT_TO_IMAGE: [("prompt", "a cat")], IMAGE_TO_IMAGE: [("prompt", "a cat")]}
# The values the DDIM sampler of the scripts crashes on, as listed by sd-scripts.md.
CRASHING_STEPS = [3, 9, 27, 36, 37, *range(101, 112)]


def validate(endpoint: str, *fields: tuple[str, object], files: list[str] | None = None):
    base = PROMPT.get(endpoint, [])
    given = {name for name, _ in fields}
    merged = [pair for pair in base if pair[0] not in given] + list(fields)
    return validate_params(endpoint, merged, FILES[endpoint] if files is None else files)


def refusal(endpoint: str, *fields: tuple[str, object], files: list[str] | None = None) -> ApiError:
    with pytest.raises(ApiError) as caught:
        validate(endpoint, *fields, files=files)
    return caught.value


# --- defaults and normalisation -------------------------------------------------------------


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_defaults_are_applied_with_exactly_the_endpoint_keys(endpoint: str) -> None:
    params = validate(endpoint)
    spec = ENDPOINTS[endpoint]
    # A field added later (Endpoint.later) is left out at its default: ids stay the same.
    expected = {
        k: v for k, v in spec.defaults.items() if v is not None and k not in spec.later
    }
    assert params == {**expected, **dict(PROMPT.get(endpoint, []))}
    assert list(params) == [name for name in spec.defaults if name not in spec.later]


def test_plms_is_kept_only_when_asked_for_and_refuses_an_eta() -> None:
    assert "plms" not in validate("text-to-image", ("plms", "0"))
    assert validate("text-to-image", ("plms", "1"))["plms"] == 1
    with pytest.raises(ApiError) as caught:
        validate("text-to-image", ("plms", "1"), ("eta", "0.5"))
    assert caught.value.field == "eta" and "plms" in caught.value.message
    with pytest.raises(ApiError) as caught:
        validate("image-to-image", ("plms", "1"), files=["image"])
    assert caught.value.code == "unknown_field"


def test_text_to_image_defaults_match_the_original() -> None:
    assert validate(TEXT_TO_IMAGE) == {
        "prompt": "a cat",
        "iterations": 1,
        "batchSize": 1,
        "steps": 8,
        "seed": 42,
        "width": 512,
        "height": 512,
        "guidanceScale": 7.5,
        "eta": 0.0,
    }


def test_inpaint_returns_only_steps_and_seed() -> None:
    assert validate(INPAINT_IMAGE, ("steps", "40"), ("seed", "7")) == {"steps": 40, "seed": 7}


@pytest.mark.parametrize(
    ("value", "expected"),
    [("12", 12), (" 12 ", 12), ("+12", 12), ("012", 12), ("\t12\n", 12), (12, 12)],
)
def test_integers_from_strings_and_json(value: object, expected: int) -> None:
    steps = validate(TEXT_TO_IMAGE, ("steps", value))["steps"]
    assert steps == expected
    assert type(steps) is int


@pytest.mark.parametrize(
    ("value", "expected"),
    [("7", 7.0), ("7.25", 7.25), (" .5 ", 0.5), ("5.", 5.0), ("1e1", 10.0), (7, 7.0), (7.5, 7.5)],
)
def test_floats_from_strings_and_json(value: object, expected: float) -> None:
    scale = validate(TEXT_TO_IMAGE, ("guidanceScale", value))["guidanceScale"]
    assert scale == expected
    assert type(scale) is float


def test_seed_accepts_the_whole_32_bit_range() -> None:
    assert validate(TEXT_TO_IMAGE, ("seed", "0"))["seed"] == 0
    assert validate(TEXT_TO_IMAGE, ("seed", str(MAX_SEED)))["seed"] == 2**32 - 1


def test_limits_at_their_bounds_are_accepted() -> None:
    params = validate(
        TEXT_TO_IMAGE,
        ("iterations", str(MAX_IMAGES // MAX_BATCH_SIZE)),
        ("batchSize", str(MAX_BATCH_SIZE)),
        ("steps", str(MAX_STEPS)),
        ("width", "1024"),
        ("height", "1024"),
        ("guidanceScale", "50"),
        ("eta", "1"),
    )
    assert params["width"] * params["height"] == MAX_PIXELS
    assert validate(TEXT_TO_IMAGE, ("width", "256"), ("height", "256"))["width"] == 256
    assert validate(TEXT_TO_IMAGE, ("width", "2048"), ("height", "512"))["height"] == 512
    assert validate(TEXT_TO_IMAGE, ("iterations", str(MAX_ITERATIONS)))["iterations"] == 50


def test_strength_times_steps_of_exactly_one_is_accepted() -> None:
    params = validate(IMAGE_TO_IMAGE, ("strength", "0.5"), ("steps", "2"))
    assert (params["strength"], params["steps"]) == (0.5, 2)


# --- refusals, table-driven -----------------------------------------------------------------

TXT, IMG, INP = TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINT_IMAGE
BAD: list[tuple[str, list[tuple[str, object]], int, str, str, str]] = [
    # endpoint, fields, status, code, field, a piece of the message
    (TXT, [("step", "9")], 400, "unknown_field", "step", 'did you mean "steps"?'),
    (TXT, [("Steps", "9")], 400, "unknown_field", "Steps", 'did you mean "steps"?'),
    (TXT, [("batch_size", "2")], 400, "unknown_field", "batch_size", '"batchSize"'),
    (
        TXT,
        [("outputDirectoryPath", "/etc")],
        400,
        "unknown_field",
        "outputDirectoryPath",
        "unknown",
    ),
    (TXT, [("modelFilePath", "/x.ckpt")], 400, "unknown_field", "modelFilePath", "unknown"),
    (TXT, [("ckpt", "/x.ckpt")], 400, "unknown_field", "ckpt", "unknown field"),
    (TXT, [("strength", "0.5")], 400, "unknown_field", "strength", "only image-to-image"),
    (INP, [("prompt", "a cat")], 400, "unknown_field", "prompt", "takes no prompt"),
    (IMG, [("width", "512")], 400, "unknown_field", "width", "uploaded image"),
    (IMG, [("height", "512")], 400, "unknown_field", "height", "uploaded image"),
    (INP, [("width", "512")], 400, "unknown_field", "width", "uploaded image"),
    (INP, [("guidanceScale", "7")], 400, "unknown_field", "guidanceScale", "unknown"),
    (TXT, [("", "x")], 400, "unknown_field", "", "unknown"),
    (TXT, [("steps", "8"), ("steps", "9")], 400, "duplicate_field", "steps", "2 times"),
    (TXT, [("prompt", "a"), ("prompt", "b")], 400, "duplicate_field", "prompt", "send it once"),
    (IMG, [("image", "data:...")], 400, "invalid_field", "image", "must be a file upload"),
    (INP, [("mask", "abc")], 400, "invalid_field", "mask", "must be a file upload"),
    (TXT, [("prompt", None)], 400, "invalid_field", "prompt", "must be a string"),
    (TXT, [("prompt", 5)], 400, "invalid_field", "prompt", "must be a string"),
    (TXT, [("prompt", ["a"])], 400, "invalid_field", "prompt", "must be a string"),
    (TXT, [("prompt", "")], 400, "invalid_field", "prompt", "must not be empty"),
    (TXT, [("prompt", " \n\t ")], 400, "invalid_field", "prompt", "must not be empty"),
    (TXT, [("prompt", "x" * 1001)], 400, "invalid_field", "prompt", "at most 1000 characters"),
    (TXT, [("prompt", "a\x00b")], 400, "invalid_field", "prompt", "U+0000 at position 1"),
    (TXT, [("prompt", "a\x1b[31m")], 400, "invalid_field", "prompt", "U+001B"),
    (TXT, [("prompt", "a\x7f")], 400, "invalid_field", "prompt", "U+007F"),
    (TXT, [("prompt", "a\ud800")], 400, "invalid_field", "prompt", "surrogate"),
    (TXT, [("steps", "8.0")], 400, "invalid_field", "steps", "steps must be an integer"),
    (TXT, [("steps", "8.5")], 400, "invalid_field", "steps", "steps must be an integer"),
    (TXT, [("steps", "1e3")], 400, "invalid_field", "steps", "steps must be an integer"),
    (TXT, [("steps", "")], 400, "invalid_field", "steps", "steps must be an integer"),
    (TXT, [("steps", "abc")], 400, "invalid_field", "steps", "steps must be an integer"),
    (TXT, [("steps", "1_0")], 400, "invalid_field", "steps", "steps must be an integer"),
    (TXT, [("steps", "١٠")], 400, "invalid_field", "steps", "steps must be an integer"),
    (TXT, [("steps", "0x10")], 400, "invalid_field", "steps", "steps must be an integer"),
    (TXT, [("steps", 8.5)], 400, "invalid_field", "steps", "steps must be an integer"),
    (TXT, [("steps", 8.0)], 400, "invalid_field", "steps", "steps must be an integer"),
    (TXT, [("steps", True)], 400, "invalid_field", "steps", "steps must be an integer"),
    (TXT, [("steps", None)], 400, "invalid_field", "steps", "steps must be an integer"),
    (TXT, [("steps", [8])], 400, "invalid_field", "steps", "steps must be an integer"),
    (TXT, [("steps", {"v": 8})], 400, "invalid_field", "steps", "steps must be an integer"),
    (TXT, [("seed", "9" * 5000)], 400, "invalid_field", "seed", "between 0 and 4294967295"),
    (TXT, [("seed", 10**400)], 400, "invalid_field", "seed", "between 0 and 4294967295"),
    (TXT, [("seed", "-1")], 400, "invalid_field", "seed", "between 0 and 4294967295"),
    (TXT, [("seed", str(2**32))], 400, "invalid_field", "seed", "between 0 and 4294967295"),
    (TXT, [("steps", "0")], 400, "invalid_field", "steps", "steps must be between 1 and 250"),
    (TXT, [("steps", "251")], 400, "invalid_field", "steps", "steps must be between 1 and 250"),
    (TXT, [("steps", "-8")], 400, "invalid_field", "steps", "steps must be between 1 and 250"),
    (TXT, [("iterations", "0")], 400, "invalid_field", "iterations", "between 1 and 50"),
    (TXT, [("iterations", "51")], 400, "invalid_field", "iterations", "between 1 and 50"),
    (TXT, [("batchSize", "0")], 400, "invalid_field", "batchSize", "between 1 and 8"),
    (TXT, [("batchSize", "9")], 400, "invalid_field", "batchSize", "between 1 and 8"),
    (
        TXT,
        [("iterations", "13"), ("batchSize", "8")],
        400,
        "invalid_field",
        "iterations",
        "13 × 8 = 104",
    ),
    (TXT, [("width", "500")], 400, "invalid_field", "width", "multiple of 64 between 64 and 2048"),
    (TXT, [("height", "0")], 400, "invalid_field", "height", "multiple of 64"),
    (TXT, [("width", "2112")], 400, "invalid_field", "width", "multiple of 64"),
    (TXT, [("width", "64"), ("height", "512")], 400, "invalid_field", "width", "256×256"),
    (TXT, [("width", "192"), ("height", "320")], 400, "invalid_field", "width", "watermark"),
    (TXT, [("width", "2048"), ("height", "1024")], 400, "invalid_field", "width", "too large"),
    (TXT, [("width", "1088"), ("height", "1024")], 400, "invalid_field", "width", "1048576"),
    (TXT, [("guidanceScale", "-0.5")], 400, "invalid_field", "guidanceScale", "between 0 and 50"),
    (TXT, [("guidanceScale", "50.5")], 400, "invalid_field", "guidanceScale", "between 0 and 50"),
    (TXT, [("guidanceScale", "nan")], 400, "invalid_field", "guidanceScale", "must be a number"),
    (TXT, [("guidanceScale", "inf")], 400, "invalid_field", "guidanceScale", "must be a number"),
    (TXT, [("guidanceScale", "1e999")], 400, "invalid_field", "guidanceScale", "finite"),
    (TXT, [("guidanceScale", float("nan"))], 400, "invalid_field", "guidanceScale", "finite"),
    (TXT, [("guidanceScale", float("inf"))], 400, "invalid_field", "guidanceScale", "finite"),
    (TXT, [("guidanceScale", 10**400)], 400, "invalid_field", "guidanceScale", "between 0 and 50"),
    (TXT, [("guidanceScale", "")], 400, "invalid_field", "guidanceScale", "must be a number"),
    (TXT, [("guidanceScale", "7,5")], 400, "invalid_field", "guidanceScale", "must be a number"),
    (TXT, [("guidanceScale", False)], 400, "invalid_field", "guidanceScale", "must be a number"),
    (TXT, [("guidanceScale", None)], 400, "invalid_field", "guidanceScale", "must be a number"),
    (TXT, [("eta", "1.01")], 400, "invalid_field", "eta", "between 0 and 1"),
    (TXT, [("eta", "-0.1")], 400, "invalid_field", "eta", "between 0 and 1"),
    (IMG, [("strength", "1")], 400, "invalid_field", "strength", "greater than 0 and less than 1"),
    (IMG, [("strength", "0")], 400, "invalid_field", "strength", "greater than 0 and less than 1"),
    (IMG, [("strength", 1.5)], 400, "invalid_field", "strength", "less than 1"),
    (IMG, [("strength", "0.01")], 400, "invalid_field", "strength", "zero steps"),
    (IMG, [("strength", "0.4"), ("steps", "2")], 400, "invalid_field", "strength", "0.4 × 2"),
    (TXT, [("steps", "9")], 400, "invalid_field", "steps", "use 8 or 10"),
    (IMG, [("steps", "36")], 400, "invalid_field", "steps", "use 35 or 38"),
    (INP, [("steps", "105")], 400, "invalid_field", "steps", "use 100 or 112"),
]


@pytest.mark.parametrize(
    ("endpoint", "fields", "status", "code", "field", "message"),
    BAD,
    ids=[f"{row[0]}-{row[1]!r:.60}" for row in BAD],
)
def test_bad_inputs_are_refused(
    endpoint: str,
    fields: list[tuple[str, object]],
    status: int,
    code: str,
    field: str,
    message: str,
) -> None:
    error = refusal(endpoint, *fields)
    assert (error.status, error.code, error.field) == (status, code, field)
    assert message in error.message
    assert error.body() == {"error": {"code": code, "field": field, "message": error.message}}


def test_missing_prompt() -> None:
    for endpoint in (TEXT_TO_IMAGE, IMAGE_TO_IMAGE):
        with pytest.raises(ApiError) as caught:
            validate_params(endpoint, [("steps", "10")], FILES[endpoint])
        error = caught.value
        assert (error.status, error.code, error.field) == (400, "missing_field", "prompt")


@pytest.mark.parametrize(
    ("endpoint", "files", "field"),
    [(IMG, [], "image"), (INP, [], "image"), (INP, ["image"], "mask"), (INP, ["mask"], "image")],
)
def test_missing_upload(endpoint: str, files: list[str], field: str) -> None:
    error = refusal(endpoint, files=files)
    assert (error.status, error.code, error.field) == (400, "missing_field", field)
    assert "file" in error.message


@pytest.mark.parametrize(
    ("endpoint", "files", "code", "field"),
    [
        (TXT, ["image"], "unknown_field", "image"),
        (IMG, ["image", "mask"], "unknown_field", "mask"),
        (IMG, ["image", "picture"], "unknown_field", "picture"),
        (INP, ["image", "mask", "image"], "duplicate_field", "image"),
        (TXT, ["prompt"], "invalid_field", "prompt"),
    ],
)
def test_bad_uploads(endpoint: str, files: list[str], code: str, field: str) -> None:
    error = refusal(endpoint, files=files)
    assert (error.status, error.code, error.field) == (400, code, field)


def test_all_unknown_names_are_listed_with_suggestions() -> None:
    error = refusal(TEXT_TO_IMAGE, ("step", "3"), ("ckpt", "x"), ("seeed", "1"))
    assert error.field == "step"
    assert error.message.startswith('unknown fields "step" (did you mean "steps"?), "ckpt"')
    assert '"seeed" (did you mean "seed"?)' in error.message


def test_the_exact_unknown_field_message_for_one_name() -> None:
    error = refusal(TEXT_TO_IMAGE, ("step", "10"))
    assert error.message.startswith('unknown field "step" (did you mean "steps"?)')


def test_unknown_names_come_before_value_errors() -> None:
    error = refusal(TEXT_TO_IMAGE, ("steps", "abc"), ("modelFilePath", "/etc/passwd"))
    assert error.code == "unknown_field"


def test_a_huge_unknown_name_is_refused_with_a_short_message() -> None:
    error = refusal(TEXT_TO_IMAGE, ("s" * 1_000_000, "1"))
    assert error.code == "unknown_field"
    assert len(error.message) < 500


# --- the DDIM crash values ------------------------------------------------------------------


def test_ddim_crash_values_within_range_are_the_documented_ones() -> None:
    crashing = [s for s in range(1, MAX_STEPS + 1) if ddim_step_crashes(s)]
    assert crashing == CRASHING_STEPS


def test_ddim_crash_values_beyond_range_match_the_reference() -> None:
    assert all(ddim_step_crashes(s) for s in [*range(251, 334), *range(501, 1001), 1001, 5000])
    assert not any(ddim_step_crashes(s) for s in [334, 400, 500])


@pytest.mark.parametrize("steps", CRASHING_STEPS)
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_every_crash_value_is_refused_with_the_nearest_safe_values(
    endpoint: str, steps: int
) -> None:
    error = refusal(endpoint, ("steps", str(steps)))
    assert (error.code, error.field) == ("invalid_field", "steps")
    nearest = nearest_safe_steps(steps)
    assert len(nearest) == 2
    below, above = nearest
    assert below < steps < above
    assert not ddim_step_crashes(below)
    assert not ddim_step_crashes(above)
    assert all(ddim_step_crashes(s) for s in range(below + 1, above))
    assert error.message == (
        f"steps={steps} crashes the DDIM sampler of the Stable Diffusion scripts; "
        f"use {below} or {above}"
    )


def test_nearest_safe_steps_examples() -> None:
    assert nearest_safe_steps(9) == [8, 10]
    assert nearest_safe_steps(3) == [2, 4]
    assert nearest_safe_steps(37) == [35, 38]
    assert nearest_safe_steps(101) == [100, 112]
    assert nearest_safe_steps(8) == [8]
    assert nearest_safe_steps(300) == [250]


def test_every_other_step_count_is_accepted() -> None:
    for steps in range(1, MAX_STEPS + 1):
        if steps not in CRASHING_STEPS:
            assert validate(INPAINT_IMAGE, ("steps", str(steps)))["steps"] == steps


# --- prompts are returned verbatim ----------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        'a "quoted" cat',
        "it's a cat",
        "$(rm -rf /) and `reboot` and ${HOME}",
        "--outdir /etc",
        "-n",
        "  padded with spaces  ",
        "line one\nline two\r\nline three\ttabbed",
        "ünïcödé 猫 🐈 \u200b zero width",
        "semi; colon | pipe & amp > redirect < in",
        "\\backslash\\ and %s and {braces}",
        "x" * MAX_PROMPT_LENGTH,
    ],
)
def test_prompts_are_returned_verbatim(prompt: str) -> None:
    assert validate(TEXT_TO_IMAGE, ("prompt", prompt))["prompt"] == prompt
    assert validate(IMAGE_TO_IMAGE, ("prompt", prompt))["prompt"] == prompt


def test_prompt_limit_counts_characters_not_bytes() -> None:
    prompt = "猫" * MAX_PROMPT_LENGTH
    assert validate(TEXT_TO_IMAGE, ("prompt", prompt))["prompt"] == prompt


def test_min_pixels_constant_is_the_watermark_minimum() -> None:
    assert MIN_PIXELS == 256 * 256
    assert MAX_PIXELS == 1024 * 1024
