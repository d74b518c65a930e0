"""AUTOMATIC1111's POST /sdapi/v1/img2img against a real demo server: init_images[0] as raw
base64 or a data: URL, resized to width × height ("just resize"), a mask running the inpaint
script (white repaints, inpainting_mask_invert honoured, the prompt named as not honoured),
and bad images refused with FastAPI's 422."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from PIL import Image

from helpers import Server, mask_bytes, png_bytes


def post(server: Server, doc: Any) -> Any:
    body = json.dumps(doc).encode()
    return server.request(
        "POST", "/sdapi/v1/img2img", body, {"Content-Type": "application/json"}, timeout=60
    )


def b64(data: bytes, prefix: bool = False) -> str:
    text = base64.b64encode(data).decode()
    return f"data:image/png;base64,{text}" if prefix else text


def job_input(server: Server, endpoint: str, name: str) -> Image.Image:
    item = server.get("/jobs?limit=1").json()["items"][0]
    assert item["endpoint"] == endpoint
    path = server.output / endpoint / item["id"] / "inputs" / name
    return Image.open(io.BytesIO(path.read_bytes()))


def test_an_init_image_is_resized_to_the_size_asked(shared_server: Server) -> None:
    for prefix in (False, True):
        resp = post(
            shared_server,
            {
                "init_images": [b64(png_bytes(300, 200, (10, 200, 30)), prefix)],
                "prompt": "autumn",
                "steps": 10,
                "seed": 3,
                "width": 512,
                "height": 384,
                "denoising_strength": 0.5,
            },
        )
        assert resp.status == 200, resp.body
        doc = resp.json()
        assert doc["parameters"]["init_images"] is None
        info = json.loads(doc["info"])
        assert (
            info["denoising_strength"] == 0.5 and "Denoising strength: 0.5" in info["infotexts"][0]
        )
        with Image.open(io.BytesIO(base64.b64decode(doc["images"][0]))) as made:
            assert made.size == (512, 384)
        stretched = job_input(shared_server, "image-to-image", "image.png")
        assert stretched.size == (512, 384)
        assert stretched.getpixel((256, 192)) == (10, 200, 30)


def test_a_mask_runs_the_inpaint_script_and_invert_is_honoured(shared_server: Server) -> None:
    image = b64(png_bytes(320, 320))
    results = []
    for invert in (0, 1):
        resp = post(
            shared_server,
            {
                "init_images": [image],
                "mask": b64(mask_bytes(320, 320), prefix=True),
                "inpainting_mask_invert": invert,
                "prompt": "a door",
                "steps": 8,
                "seed": 11,
                "width": 320,
                "height": 320,
            },
        )
        assert resp.status == 200, resp.body
        info = json.loads(resp.json()["info"])
        assert (
            "prompt (the inpaint model takes none)"
            in info["extra_generation_params"]["Not honoured"]
        )
        assert "Model: inpaint-image" in info["infotexts"][0]
        mask = job_input(shared_server, "inpaint-image", "image_mask.png").convert("L")
        results.append((mask.getpixel((160, 160)), mask.getpixel((5, 5))))
    assert results == [(255, 0), (0, 255)]  # white repaints the middle; inverted, the rest


def test_bad_images_are_422_naming_them(shared_server: Server) -> None:
    base = {"prompt": "x", "steps": 8, "width": 512, "height": 512}
    for images, loc in (
        (["not base64 at all!"], ["body", "init_images", 0]),
        ([b64(b"GIF89a not an image")], ["body", "init_images", 0]),
        ([b64(png_bytes(64, 64))], None),  # fine: any size is resized
    ):
        resp = post(shared_server, {**base, "init_images": images})
        if loc is None:
            assert resp.status == 200, resp.body
            continue
        assert resp.status == 422, resp.body
        assert resp.json()["detail"][0]["loc"] == loc
    resp = post(shared_server, {**base, "init_images": [b64(png_bytes(64, 64))], "mask": "@@"})
    assert resp.status == 422 and resp.json()["detail"][0]["loc"] == ["body", "mask"]
    resp = post(shared_server, base)
    assert resp.status == 404 and resp.json()["detail"] == "Init image not found"
    resp = post(
        shared_server, {**base, "init_images": [b64(png_bytes(64, 64))], "denoising_strength": 1}
    )
    assert resp.status == 422 and resp.json()["detail"][0]["loc"] == ["body", "denoising_strength"]
    shared_server.assert_serving()
