"""Unit tests of the dialect's pure parts: reading a body as its pydantic models do, the
translation into our parameters and notes, info, the model's names and progress."""

from __future__ import annotations

import pytest

from sd_rest.api.a1111 import catalog
from sd_rest.api.a1111.errors import DialectError
from sd_rest.api.a1111.info import build_info
from sd_rest.api.a1111.request import IMG2IMG, TXT2IMG, read_fields
from sd_rest.api.a1111.translate import plan_img2img, plan_txt2img
from sd_rest.images.pngmeta import add_text_chunks, read_text
from sd_rest.state.jobs import Job, Status

from helpers import png_bytes


def txt2img(**body: object) -> dict[str, object]:
    return read_fields({"prompt": "a cat", **body}, TXT2IMG)


def test_types_are_coerced_like_pydantic_and_unknown_fields_kept() -> None:
    fields = txt2img(steps="12", cfg_scale=5, seed=3.0, restore_faces=1, url="http://x", auth="")
    assert (fields["steps"], fields["cfg_scale"], fields["seed"]) == (12, 5.0, 3)
    assert fields["restore_faces"] is True and fields["url"] == "http://x"
    assert txt2img(steps=None)["steps"] == 50  # null is the default
    with pytest.raises(DialectError) as caught:
        txt2img(steps=1.5)
    assert caught.value.status == 422
    (detail,) = caught.value.body["detail"]
    assert detail["loc"] == ["body", "steps"] and detail["type"] == "type_error.integer"


def test_txt2img_maps_to_our_parameters() -> None:
    plan = plan_txt2img(txt2img(steps=8, seed=-1, batch_size=2, n_iter=3, eta=0.5), 77)
    assert plan.endpoint == "text-to-image" and plan.seed == 77 and plan.notes == ()
    assert plan.params == {
        "prompt": "a cat", "iterations": 3, "batchSize": 2, "steps": 8, "seed": 77,
        "width": 512, "height": 512, "guidanceScale": 7.0, "eta": 0.5,
    }  # fmt: skip


def test_plms_and_samplers_we_lack() -> None:
    plms = plan_txt2img(txt2img(steps=8, sampler_name="plms", eta=0.3), 1)
    assert plms.params["plms"] == 1 and plms.params["eta"] == 0.0 and plms.sampler == "PLMS"
    assert plms.notes == ("eta 0.3 (PLMS takes none: ran 0)",)
    euler = plan_txt2img(txt2img(steps=8, sampler_index="Euler a"), 1)
    assert euler.sampler == "DDIM" and euler.notes == ('sampler "Euler a" (ran DDIM)',)
    assert "plms" not in euler.params


def test_what_cannot_be_honoured_is_named_in_order() -> None:
    plan = plan_txt2img(
        txt2img(steps=8, negative_prompt="ugly", restore_faces=True, styles=["a"], enable_hr=True),
        1,
    )
    assert plan.notes == (
        'negative prompt "ugly" (the scripts take none)',
        "face restoration (restore_faces)",
        'styles "a"',
        "hires fix (enable_hr)",
    )


def test_img2img_resizes_and_a_mask_is_inpainting() -> None:
    import base64

    image = base64.b64encode(png_bytes(100, 50)).decode()
    body = {"prompt": "p", "steps": 8, "init_images": [image], "width": 256, "height": 256}
    plan = plan_img2img(read_fields(body, IMG2IMG), 5)
    assert plan.endpoint == "image-to-image" and plan.params["strength"] == 0.75
    masked = plan_img2img(read_fields({**body, "mask": image, "n_iter": 2}, IMG2IMG), 5)
    assert masked.endpoint == "inpaint-image" and masked.params == {"steps": 8, "seed": 5}
    assert masked.notes == (
        "prompt (the inpaint model takes none)",
        "batch_size × n_iter = 2 (inpainting makes one image)",
    )


def test_info_carries_the_infotexts_and_notes() -> None:
    plan = plan_txt2img(txt2img(steps=8, seed=4, negative_prompt="x"), 0)
    info = build_info(
        txt2img(steps=8, negative_prompt="x"), plan, [4], ["text"], "m", "ab" * 32, 0.0
    )
    assert info["infotexts"] == ["text"] and info["sd_model_hash"] == "ab" * 5
    assert info["extra_generation_params"] == {"Not honoured": plan.notes[0]}
    assert info["negative_prompt"] == "x" and info["all_seeds"] == [4]


def test_the_parameters_chunk_is_read_back() -> None:
    png = add_text_chunks(png_bytes(8, 8), [("parameters", "a\nSteps: 8"), ("sd-rest", "{}")])
    assert read_text(png, "parameters") == "a\nSteps: 8" and read_text(png, "other") is None
    assert read_text(add_text_chunks(png_bytes(8, 8), [("parameters", "猫")]), "parameters") == "猫"


def test_the_model_answers_to_its_names_and_progress_is_idle_at_zero(tmp_path) -> None:
    model = catalog.Model(tmp_path / "text-to-image.ckpt", "c0ffee" + "0" * 58)
    assert model.title == "text-to-image.ckpt [c0ffee0000]"
    assert all(model.answers_to(n) for n in (model.title, "text-to-image", "c0ffee0000"))
    assert not model.answers_to("other")
    assert catalog.Model(tmp_path / "a.ckpt", None).title == "a.ckpt"
    idle = catalog.progress([], 0)
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    job = Job(
        "a" * 32, "text-to-image", {"steps": 10, "iterations": 2, "batchSize": 1}, "c", {}, {}, 1
    )
    job.status, job.progress, job.started_at = Status.IN_PROGRESS, (2, 0.5), 100.0
    doc = catalog.progress([job], 1, now=175.0)
    assert doc["progress"] == 0.75 and doc["state"]["job_count"] == 2
    assert doc["state"]["sampling_step"] == 5 and doc["eta_relative"] == 25.0
