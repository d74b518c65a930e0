"""Unit tests of the dialect's pure parts: reading a body as its pydantic models do, the
translation into our parameters and notes, info, the model's names and progress."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image, PngImagePlugin

from sd_rest.api.a1111 import catalog
from sd_rest.api.a1111.errors import DialectError
from sd_rest.api.a1111.info import build_info
from sd_rest.api.a1111.request import IMG2IMG, TXT2IMG, parse_body, read_fields
from sd_rest.api.a1111.routes import encode_images
from sd_rest.api.a1111.translate import plan_img2img, plan_txt2img
from sd_rest.images.pngmeta import add_text_chunks, read_text
from sd_rest.images.uploads import prepare_init_image, prepare_inpaint
from sd_rest.state.jobs import Job, Status

from helpers import png_bytes


def txt2img(**body: object) -> dict[str, object]:
    return read_fields({"prompt": "a cat", **body}, TXT2IMG)


def test_types_are_coerced_like_pydantic_and_unknown_fields_dropped() -> None:
    fields = txt2img(steps="12", cfg_scale=5, seed=3.0, restore_faces=1, url="http://x", auth="k")
    assert (fields["steps"], fields["cfg_scale"], fields["seed"]) == (12, 5.0, 3)
    assert fields["restore_faces"] is True
    # As its models drop them: SillyTavern's `auth` is never echoed in `parameters`.
    assert "url" not in fields and "auth" not in fields and set(fields) == set(TXT2IMG)
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
    # A title read before the file changed (its hash stale or unknown) names it by its name.
    for stale in ("text-to-image.ckpt [deadbeef00]", "text-to-image [0123456789]  "):
        assert model.answers_to(stale), stale
    assert not model.answers_to("other.ckpt [c0ffee0000]")
    assert not model.answers_to("[c0ffee0000]")
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


# --- hostile bodies and values: FastAPI's 422, never a 500 ---------------------------------


def nested(depth: int) -> bytes:
    return b'{"prompt": "x", "styles": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    "raw",
    [
        nested(200_000),
        b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
        b'{"prompt": "x", "steps": ' + b"9" * 4000 + b"}",
        b'{"prompt": "x", "seed": -' + b"1" * 4000 + b"}",
        b'{"prompt": "x", "n_iter": ' + b"7" * 5000 + b"}",
        b'{"prompt": "\xff"}',
    ],
    ids=["nested lists", "nested objects", "4000 digits", "-4000 digits", "5000 digits", "utf8"],
)
def test_parse_body_refuses_hostile_json_as_fastapis_422(raw: bytes) -> None:
    with pytest.raises(DialectError) as caught:
        parse_body(raw)
    assert caught.value.status == 422
    (detail,) = caught.value.body["detail"]
    assert detail["loc"][0] == "body" and detail["type"] == "value_error.jsondecode"
    assert len(detail["msg"]) < 300


def test_a_nested_style_or_image_is_a_422_naming_it() -> None:
    deep: list[object] = []
    for _ in range(900):  # within json's recursion limit, deep enough for str() to fail
        deep = [deep]
    for body, specs, loc in (
        ({"prompt": "x", "styles": ["ok", deep]}, TXT2IMG, ["body", "styles", 1]),
        ({"prompt": "x", "init_images": [{"a": 1}]}, IMG2IMG, ["body", "init_images", 0]),
    ):
        with pytest.raises(DialectError) as caught:
            read_fields(body, specs)
        assert caught.value.status == 422
        assert caught.value.body["detail"][0]["loc"] == loc


def masked_body(**changes: object) -> dict[str, object]:
    image = base64.b64encode(png_bytes(256, 256)).decode()
    body = {"prompt": "p", "steps": 8, "init_images": [image], "mask": image}
    return {**body, "width": 256, "height": 256, **changes}


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"batch_size": 10**2200, "n_iter": 10**2200}, {"batch_size", "n_iter"}),
        ({"batch_size": 10**2200}, {"batch_size"}),
        ({"n_iter": 10**300}, {"n_iter"}),
        ({"batch_size": 9}, {"batch_size"}),
        ({"cfg_scale": 1e9}, {"cfg_scale"}),
        ({"cfg_scale": -1}, {"cfg_scale"}),
        ({"eta": 5}, {"eta"}),
        ({"denoising_strength": 2}, {"denoising_strength"}),
        ({"denoising_strength": -0.5}, {"denoising_strength"}),
        ({"steps": 10**4000}, {"steps"}),
        ({"seed": 10**4000}, {"seed"}),
    ],
)
def test_out_of_range_values_with_a_mask_are_a_422_as_without(
    changes: dict[str, object], names: set[str]
) -> None:
    for body in (masked_body(**changes), {**masked_body(**changes), "mask": None}):
        with pytest.raises(DialectError) as caught:
            plan_img2img(read_fields(body, IMG2IMG), 5)
        assert caught.value.status == 422
        (detail,) = caught.value.body["detail"]
        assert detail["loc"][0] == "body" and detail["loc"][1] in names


def test_txt2img_refuses_4000_digit_integers() -> None:
    for name in ("steps", "seed", "batch_size", "n_iter", "width"):
        with pytest.raises(DialectError) as caught:
            plan_txt2img(txt2img(**{name: 10**4000}), 1)
        assert caught.value.body["detail"][0]["loc"] == ["body", name]


def test_inpainting_names_each_sent_field_it_cannot_use() -> None:
    body = masked_body(cfg_scale=7, denoising_strength=0.5, eta=0.2, sampler_name="Euler a")
    plan = plan_img2img(read_fields(body, IMG2IMG), 5, sent=frozenset(body))
    assert plan.endpoint == "inpaint-image" and plan.params == {"steps": 8, "seed": 5}
    assert plan.notes == (
        "prompt (the inpaint model takes none)",
        'sampler "Euler a" (ran DDIM)',
        "cfg_scale 7 (inpainting runs without guidance)",
        "denoising_strength 0.5 (inpainting repaints the mask whole: ran 1)",
        "eta 0.2 (inpainting runs 0)",
    )
    # Not sent, or sent as what inpainting does: nothing to name.
    quiet = masked_body(prompt="", denoising_strength=1.0, eta=0)
    plan = plan_img2img(read_fields(quiet, IMG2IMG), 5, sent=frozenset(quiet))
    assert plan.notes == ()
    info = build_info(read_fields(body, IMG2IMG), plan, [5], ["t"], "m", None, 0.0)
    assert info["cfg_scale"] is None and info["denoising_strength"] is None


def test_long_notes_are_capped() -> None:
    styles = [f"style {n} " + "x" * 100 for n in range(1000)]
    plan = plan_txt2img(txt2img(steps=8, styles=styles, negative_prompt="n" * 100_000), 1)
    (negative, style_note) = plan.notes
    assert negative == 'negative prompt "' + "n" * 60 + '…" (the scripts take none)'
    assert style_note.startswith('styles "style 0 ') and style_note.endswith("and 995 more")
    assert style_note.count('"style ') == 5
    assert all(len(note) <= 300 for note in plan.notes)


def job(id_: str, status: Status, progress: tuple[int, float] | None = None) -> Job:
    made = Job(id_ * 32, "text-to-image", {"steps": 10}, "c", {}, {}, 1)
    made.status, made.progress, made.started_at = status, progress, 100.0
    return made


def test_jobs_handed_to_worker_hosts_but_still_queued_are_not_running() -> None:
    """With --broker a job has a run from the moment it is handed to the worker hosts, while it
    still waits (in the queue) for one: progress reads the first IN_PROGRESS job, and
    interrupt ends only running jobs."""
    waiting, started, starting = (
        job("a", Status.QUEUED),
        job("b", Status.IN_PROGRESS, (1, 0.5)),
        job("c", Status.QUEUED),
    )
    runs = [waiting, started, starting]  # `starting`: taken by a local worker, script loading
    running = catalog.running(runs, [waiting])
    assert running == [started, starting]
    doc = catalog.progress(running, 1, now=110.0)
    assert doc["progress"] == 0.5 and doc["state"]["job"] == f"text-to-image {started.id}"
    assert doc["state"]["job_count"] == 3 and doc["state"]["sampling_step"] == 5
    ours = {(j.endpoint, j.id) for j in runs}
    assert catalog.interruptible(running, ours) == [started, starting]
    assert catalog.interruptible(running, {("text-to-image", started.id)}) == [started]
    loading = catalog.progress([starting], 0)
    assert loading["progress"] == 0 and loading["state"]["job_count"] == 1


def png_of(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def pixels(png: bytes) -> tuple[str, tuple[int, int], bytes]:
    with Image.open(io.BytesIO(png)) as image:
        return image.mode, image.size, image.tobytes()


def sixteen_bit_halves(low: int, high: int) -> bytes:
    """A 16-bit grey PNG of 256×256: `low` on the left half, `high` on the right (8-bit
    levels, scaled to 16 bits)."""
    image = Image.new("I;16", (256, 256), low * 257)
    image.paste(Image.new("I;16", (128, 256), high * 257), (128, 0))
    return png_of(image)


def test_images_become_the_same_pixels_as_through_our_own_api() -> None:
    """A 16-bit PNG is scaled to 8 bits (not clipped to white), transparency flattened and
    metadata dropped, as our uploads do: the job's inputs are those of the same file sent to
    POST /image-to-image or /inpaint-image."""
    rgba = Image.new("RGBA", (256, 256), (200, 30, 60, 128))
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "secret prompt")
    inputs = {
        "16-bit": sixteen_bit_halves(40, 90),
        "rgba with text and icc": png_of(rgba, pnginfo=info, icc_profile=b"\0" * 128),
    }
    for name, data in inputs.items():
        body = {"prompt": "p", "steps": 8, "init_images": [b64(data)], "width": 256, "height": 256}
        plan = plan_img2img(read_fields(body, IMG2IMG), 5)
        with Image.open(io.BytesIO(plan.uploads["image"])) as sent:
            assert "icc_profile" not in sent.info and "parameters" not in sent.info, name
        assert pixels(prepare_init_image(plan.uploads["image"])) == pixels(
            prepare_init_image(data)
        ), name
    image, mask = inputs["rgba with text and icc"], sixteen_bit_halves(100, 200)
    body = {"prompt": "", "steps": 8, "init_images": [b64(image)], "mask": b64(mask)}
    plan = plan_img2img(read_fields({**body, "width": 256, "height": 256}, IMG2IMG), 5)
    ours = prepare_inpaint(plan.uploads["image"], plan.uploads["mask"])
    native = prepare_inpaint(image, mask)
    assert [pixels(png) for png in ours] == [pixels(png) for png in native]
    with Image.open(io.BytesIO(ours[1])) as made:
        assert (made.getpixel((10, 10)), made.getpixel((200, 10))) == (0, 255)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_send_images_false_reads_the_infotexts_without_encoding(tmp_path) -> None:
    png = add_text_chunks(png_bytes(8, 8), [("parameters", "a\nSteps: 8")])
    (tmp_path / "1.png").write_bytes(png)
    paths, root = [tmp_path / "1.png"], tmp_path.resolve()
    assert encode_images(paths, tmp_path, root, send=False) == ([], ["a\nSteps: 8"])
    assert encode_images(paths, tmp_path, root, send=True) == (
        [base64.b64encode(png)],
        ["a\nSteps: 8"],
    )
