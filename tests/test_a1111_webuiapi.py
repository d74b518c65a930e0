"""The real `webuiapi` package (AUTOMATIC1111's Python client, the test extra) against a demo
server's --http-port, unchanged: what its users call."""

from __future__ import annotations

import threading
from typing import Any

import webuiapi
from PIL import Image

from helpers import http_request, start_with_http, wait_until

KEY = "webui-k3y"


def test_webuiapi_connects_lists_sets_the_model_and_makes_images(make_server) -> None:
    server = start_with_http(make_server)
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.http_port, steps=8)
    (title,) = api.util_get_model_names()
    assert title.startswith("text-to-image.ckpt [")
    api.util_set_model("text-to-image")  # its closest match, as its users type it
    assert api.util_get_current_model() == title
    api.util_wait_for_ready(check_interval=0.05)
    result = api.txt2img(prompt="a lighthouse", seed=5, batch_size=2, cfg_scale=7)
    assert len(result.images) == 2 and all(image.size == (512, 512) for image in result.images)
    assert result.info["all_seeds"] == [5, 5]
    # webuiapi sends "Euler a" and eta 1.0 by default: DDIM ran, and the sampler is named.
    assert "Euler a" in result.info["extra_generation_params"]["Not honoured"]
    assert "Eta DDIM: 1.0" in result.info["infotexts"][0]
    init = Image.new("RGB", (300, 300), (40, 90, 160))
    made = api.img2img(images=[init], prompt="at night", seed=3, width=384, height=384)
    assert made.images[0].size == (384, 384) and made.info["denoising_strength"] == 0.75
    mask = Image.new("L", (300, 300), 0)
    mask.paste(255, (100, 100, 200, 200))
    inpainted = api.img2img(
        images=[init], mask_image=mask, prompt="", seed=3, width=320, height=320
    )
    assert inpainted.images[0].size == (320, 320)
    assert inpainted.info["is_using_inpainting_conditioning"] is True
    endpoints = [item["endpoint"] for item in server.get("/jobs?limit=10").json()["items"]]
    assert endpoints[:3] == ["inpaint-image", "image-to-image", "text-to-image"]


def test_webuiapi_interrupts_a_running_job(make_server) -> None:
    server = start_with_http(make_server, env={"SD_SIM_STEP_SECONDS": "0.3"})
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.http_port)
    results: list[Any] = []
    thread = threading.Thread(
        target=lambda: results.append(api.txt2img(prompt="slow", steps=40, seed=1))
    )
    thread.start()
    wait_until(lambda: api.get_progress()["progress"] > 0, "the job to run")
    api.interrupt()
    thread.join(30)
    assert results and results[0].images == []
    assert server.get("/jobs?limit=1").json()["items"][0]["status"] == "CANCELED"
    api.util_wait_for_ready(check_interval=0.05)


def test_webuiapi_set_auth_with_the_key(make_server) -> None:
    server = start_with_http(make_server, args=["--api-key", KEY], start=False)
    server.start(wait=False)
    wait_until(lambda: _up(server.http_port), "the keyed server")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.http_port, steps=4)
    # webuiapi reads the JSON whatever the status: without the key it is our 401's.
    assert api.get_options()["error"]["code"] == "unauthorized"
    assert http_request(server.http_port, "GET", "/sdapi/v1/options").status == 401
    api.set_auth("webui", KEY)
    assert api.util_get_model_names()[0].startswith("text-to-image.ckpt")
    assert len(api.txt2img(prompt="with a key", seed=1).images) == 1


def _up(port: int) -> bool:
    try:
        return http_request(port, "GET", "/internal/ping").status == 401
    except OSError:
        return False
