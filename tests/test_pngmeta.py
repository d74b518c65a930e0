"""Text chunks added to a PNG (pngmeta.py, pure) and the two chunks every image gets
(labels.py): only text chunks are added, the script's bytes and pixels stay as they were,
AUTOMATIC1111's infotext reads back every field, and the sd-rest chunk is enough to make the
image again."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sd_rest import __version__
from sd_rest.images.pngfile import is_complete_png
from sd_rest.images.pngmeta import add_text_chunks, infotext, quote, text_chunk
from sd_rest.runs.labels import describe_run, image_texts
from sd_rest.scripts import plan_run
from sd_rest.state.jobs import Job

from helpers import png_bytes
from pngparts import chunks, parse_infotext, pixels, text_chunks, without_text

SCRIPT_PNG = png_bytes(64, 48, (10, 200, 30))


def test_chunks_go_before_iend_and_leave_every_other_byte_as_it_was() -> None:
    labelled = add_text_chunks(SCRIPT_PNG, [("parameters", "a cat\nSteps: 8"), ("sd-rest", "{}")])
    assert is_complete_png(labelled)
    kinds = [kind for kind, _ in chunks(labelled)]
    assert kinds[-3:] == [b"tEXt", b"tEXt", b"IEND"]
    assert labelled[: len(SCRIPT_PNG) - 12] == SCRIPT_PNG[:-12]  # everything up to IEND
    assert labelled[-12:] == SCRIPT_PNG[-12:]
    assert without_text(labelled, {"parameters", "sd-rest"}) == SCRIPT_PNG
    assert pixels(labelled) == pixels(SCRIPT_PNG)
    assert text_chunks(labelled) == {"parameters": "a cat\nSteps: 8", "sd-rest": "{}"}


def test_latin1_text_is_text_and_anything_else_is_utf8_itxt() -> None:
    assert text_chunk("k", "café")[4:8] == b"tEXt"
    unicode = text_chunk("k", "a 猫 🐈")
    assert unicode[4:8] == b"iTXt"
    data = unicode[8:-4]
    assert data == b"k\0\0\0\0\0" + "a 猫 🐈".encode()
    assert zlib.crc32(unicode[4:-4]) == int.from_bytes(unicode[-4:], "big")
    labelled = add_text_chunks(SCRIPT_PNG, [("k", "a 猫 🐈")])
    assert text_chunks(labelled) == {"k": "a 猫 🐈"}


@pytest.mark.parametrize("keyword", ["", " x", "x ", "a  b", "k" * 80, "é\u0100", "tab\there"])
def test_keywords_the_png_spec_refuses_are_refused(keyword: str) -> None:
    with pytest.raises(ValueError):
        text_chunk(keyword, "text")


def test_only_a_complete_png_and_text_without_nul_are_taken() -> None:
    with pytest.raises(ValueError):
        add_text_chunks(SCRIPT_PNG[:-1], [("k", "v")])
    with pytest.raises(ValueError):
        add_text_chunks(b"GIF89a", [("k", "v")])
    with pytest.raises(ValueError):
        text_chunk("k", "a\0b")


@given(
    st.lists(
        st.tuples(st.sampled_from(["parameters", "sd-rest", "Comment"]), st.text()), max_size=3
    )
)
def test_any_text_round_trips_through_pillow(texts: list[tuple[str, str]]) -> None:
    texts = [(k, t.replace("\0", "")) for k, t in texts]
    labelled = add_text_chunks(SCRIPT_PNG, texts)
    assert text_chunks(labelled) == dict(texts)
    assert pixels(labelled) == pixels(SCRIPT_PNG)


# --- AUTOMATIC1111's infotext ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["DDIM", "a, b", "key: value", 'say "hi"', '"quoted"', "two\nlines", "crlf\r\n", "x" * 300],
)
def test_values_that_would_split_the_line_are_quoted_and_read_back(value: str) -> None:
    text = infotext("a prompt", [("Steps", 8), ("Model", value), ("Seed", 1)])
    prompt, negative, settings = parse_infotext(text)
    assert (prompt, negative) == ("a prompt", "")
    assert settings == {"Steps": "8", "Model": value, "Seed": "1"}
    if value == "DDIM":
        assert quote(value) == "DDIM"


@given(
    st.text(
        st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters=","),
        min_size=1,
        max_size=40,
    ).filter(lambda s: s.strip() == s and s and not s.startswith("Negative prompt:")),
    st.text(min_size=0, max_size=30),
)
def test_prompt_and_settings_read_back(prompt: str, model: str) -> None:
    model = model.replace("\0", "")
    settings_in = [("Steps", 8), ("Sampler", "DDIM"), ("Seed", 1), ("Model", model or None)]
    text = infotext(prompt, settings_in)
    read_prompt, _, settings = parse_infotext(text)
    assert read_prompt == prompt
    assert settings["Steps"] == "8" and settings["Sampler"] == "DDIM"
    assert settings.get("Model", "") == model.strip() or quote(model) != model


def test_a_job_without_a_prompt_has_only_the_settings_line() -> None:
    text = infotext(None, [("Steps", 32), ("Sampler", "DDIM"), ("Seed", 42)])
    assert text == "Steps: 32, Sampler: DDIM, Seed: 42"
    assert parse_infotext(text) == ("", "", {"Steps": "32", "Sampler": "DDIM", "Seed": "42"})


def test_a_prompt_of_several_lines_keeps_them() -> None:
    text = infotext("line one\r\nline two\rline three", [("Steps", 8), ("Seed", 1), ("X", 2)])
    assert parse_infotext(text)[0] == "line one\nline two\nline three"


# --- the two chunks of a job's image (labels.py, pure) --------------------------------------


def _job(endpoint: str, **params: object) -> Job:
    defaults = {
        "text-to-image": {
            "prompt": "a fox, at dusk: red",
            "iterations": 2,
            "batchSize": 3,
            "steps": 8,
            "seed": 42,
            "width": 512,
            "height": 512,
            "guidanceScale": 7.5,
            "eta": 0.25,
        },
        "image-to-image": {
            "prompt": "autumn",
            "iterations": 1,
            "batchSize": 1,
            "steps": 24,
            "seed": 7,
            "guidanceScale": 7.0,
            "eta": 0.0,
            "strength": 0.75,
        },
        "inpaint-image": {"steps": 32, "seed": 42},
    }[endpoint]
    return Job(
        id="0" * 32,
        endpoint=endpoint,
        params={**defaults, **params},  # type: ignore[dict-item]
        checkpoint="/srv/secret/models/sd-v1-4.ckpt",
        uploads={"image": "ab" * 32} if endpoint != "text-to-image" else {},
        inputs={},
        seq=1,
    )


def test_text_to_image_settings_and_the_sd_rest_json() -> None:
    job = _job("text-to-image")
    plan = plan_run(job.params, job.total_images, done=2)  # resumed: 4 images left
    run = describe_run(job, plan)
    texts = dict(image_texts(run, 5, 3, (512, 512), "f" * 64, "c" * 40))
    prompt, negative, settings = parse_infotext(texts["parameters"])
    assert (prompt, negative) == ("a fox, at dusk: red", "")
    assert settings == {
        "Steps": "8",
        "Sampler": "DDIM",
        "CFG scale": "7.5",
        "Seed": "44",  # the run's seed: 42 + the 2 images done before it
        "Size": "512x512",
        "Model hash": "f" * 10,
        "Model": "sd-v1-4",
        "Eta DDIM": "0.25",
        "Batch size": "3",
        "Batch pos": "2",
        "Position in run": "3",
    }
    doc = json.loads(texts["sd-rest"])
    assert doc == {
        "format": 1,
        "server": {"name": "sd-rest", "version": __version__},
        "endpoint": "text-to-image",
        "job": "0" * 32,
        "image": {"number": 5, "seed": 44, "position": 3},
        "request": job.params,
        "uploads": {},
        "script": {
            "path": "scripts/txt2img.py",
            "flags": [
                "--prompt=a fox, at dusk: red",
                "--outdir={outdir}",
                "--skip_grid",
                "--ddim_steps=8",
                "--ddim_eta=0.25",
                "--n_iter=2",
                "--n_samples=3",
                "--scale=7.5",
                "--seed=44",
                "--ckpt={checkpoint}",
                "--H=512",
                "--W=512",
            ],
            "torchSeed": None,
        },
        "checkpoint": {"name": "sd-v1-4.ckpt", "sha256": "f" * 64},
        "fork": {"commit": "c" * 40},
    }
    assert "/srv/secret" not in texts["sd-rest"] + texts["parameters"]  # no server paths


def test_image_to_image_has_its_strength_and_inpaint_its_torch_seed() -> None:
    job = _job("image-to-image")
    run = describe_run(job, plan_run(job.params, 1, 0))
    texts = dict(image_texts(run, 1, 1, (448, 320), None, None))
    _, _, settings = parse_infotext(texts["parameters"])
    assert settings["Denoising strength"] == "0.75" and settings["Size"] == "448x320"
    assert settings["CFG scale"] == "7.0"
    assert "Model hash" not in settings and "Eta DDIM" not in settings  # not known / 0
    assert "Batch size" not in settings and "Position in run" not in settings
    doc = json.loads(texts["sd-rest"])
    assert "--init-img={inputs}/image.png" in doc["script"]["flags"]
    assert doc["checkpoint"]["sha256"] is None and doc["fork"]["commit"] is None
    assert doc["uploads"] == {"image": "ab" * 32}

    job = _job("inpaint-image")
    run = describe_run(job, plan_run(job.params, 1, 0))
    texts = dict(image_texts(run, 1, 1, (320, 512), "0" * 64, None))
    prompt, _, settings = parse_infotext(texts["parameters"])
    assert prompt == "" and settings["Steps"] == "32" and settings["Seed"] == "42"
    assert "CFG scale" not in settings
    doc = json.loads(texts["sd-rest"])
    assert doc["script"] == {
        "path": "scripts/inpaint.py",
        "flags": ["--indir={inputs}", "--outdir={outdir}", "--steps=32"],
        "torchSeed": 42,
    }


def test_labelling_a_real_png_keeps_its_pixels(tmp_path: Path) -> None:
    job = _job("text-to-image", prompt="猫 and 🐈")
    run = describe_run(job, plan_run(job.params, job.total_images, 0))
    labelled = add_text_chunks(SCRIPT_PNG, image_texts(run, 1, 1, (64, 48), None, None))
    found = text_chunks(labelled)
    assert parse_infotext(found["parameters"])[0] == "猫 and 🐈"
    assert json.loads(found["sd-rest"])["request"]["prompt"] == "猫 and 🐈"
    assert pixels(labelled) == pixels(SCRIPT_PNG)
    assert without_text(labelled, {"parameters", "sd-rest"}) == SCRIPT_PNG
