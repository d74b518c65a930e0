"""Replays of what two AUTOMATIC1111 clients send, written from their sources, against a demo
server's --http-port:

- Open WebUI, backend/open_webui/routers/images.py at commit
  02530d501461ce58ab06231d7c2ef2024a141ddf: its AUTOMATIC1111 engine reads GET
  /sdapi/v1/options (get_image_model: `sd_model_checkpoint`), GET /sdapi/v1/sd-models
  (get_models: `title`, `model_name`), then set_image_model: GET options, and when the model
  differs POST /sdapi/v1/options with the whole dict it read; then POST /sdapi/v1/txt2img with
  {prompt, batch_size, width, height, steps?, negative_prompt?}, reading `images`
  (base64 without a prefix). Its `authorization` header is `Basic <base64 of api_auth>`, or ''
  when no auth is set.
- SillyTavern, commit ba6f7b7a98cf7a5eaf4f0e81da9779a9a668ced4 (2024-09-28):
  src/endpoints/stable-diffusion.js (the /api/sd/* proxies: ping = GET options; upscalers =
  GET upscalers + latent-upscale-modes; vaes = GET sd-vae; samplers; schedulers; models = GET
  sd-models; get-model = GET options; set-model = POST options {sd_model_checkpoint} then GET
  progress until progress 0 and job_count 0; generate = POST txt2img with the whole body, and on
  a client's disconnect POST interrupt), public/scripts/extensions/stable-diffusion/index.js
  (validateAutoUrl → loadSettingOptions; generateAutoImage's body, with defaultSettings'
  values) and src/util.js getBasicAuthHeader (`Basic ` + base64 of auth: `Basic ` alone for
  its default empty auth).
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from typing import Any

from PIL import Image

from helpers import Server, http_request, start_with_http, wait_until


def openwebui_auth(api_auth: str | None) -> dict[str, str]:
    if api_auth is None:
        return {"authorization": ""}
    return {"authorization": "Basic " + base64.b64encode(api_auth.encode()).decode()}


def sillytavern_auth(auth: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


def test_open_webui_automatic1111_engine(make_server) -> None:
    server = start_with_http(make_server)
    port, auth = server.http_port, openwebui_auth(None)
    options = http_request(port, "GET", "/sdapi/v1/options", headers=auth).json()
    models = [
        {"id": m["title"], "name": m["model_name"]}
        for m in http_request(port, "GET", "/sdapi/v1/sd-models", headers=auth).json()
    ]
    assert models[0]["id"] == options["sd_model_checkpoint"]
    # set_image_model with the model the user picked (the same, then by its bare name).
    for model in (models[0]["id"], "text-to-image.ckpt"):
        options = http_request(port, "GET", "/sdapi/v1/options", headers=auth).json()
        if model != options["sd_model_checkpoint"]:
            options["sd_model_checkpoint"] = model
            posted = http_request(port, "POST", "/sdapi/v1/options", options, headers=auth)
            assert posted.status == 200, posted.body
    data = {"prompt": "a fox", "batch_size": 2, "width": 512, "height": 384, "steps": 8}
    data["negative_prompt"] = ""
    res = http_request(port, "POST", "/sdapi/v1/txt2img", data, headers=auth).json()
    for image in res["images"]:
        assert "," not in image  # get_image_data: no comma, so image/png
        with Image.open(io.BytesIO(base64.b64decode(image))) as picture:
            assert picture.size == (512, 384)
    assert len(res["images"]) == 2


def sillytavern_connect(port: int, auth: dict[str, str]) -> str:
    """validateAutoUrl: ping, then loadSettingOptions (samplers, models with the current model
    and the upscalers, schedulers, VAEs); returns the current model."""
    assert http_request(port, "GET", "/sdapi/v1/options", headers=auth).status == 200
    samplers = [
        x["name"] for x in http_request(port, "GET", "/sdapi/v1/samplers", headers=auth).json()
    ]
    assert "DDIM" in samplers  # its default sampler
    current = http_request(port, "GET", "/sdapi/v1/options", headers=auth).json()[
        "sd_model_checkpoint"
    ]
    titles = [
        x["title"] for x in http_request(port, "GET", "/sdapi/v1/sd-models", headers=auth).json()
    ]
    assert current in titles
    upscalers = [
        x["name"] for x in http_request(port, "GET", "/sdapi/v1/upscalers", headers=auth).json()
    ]
    latent = [
        x["name"]
        for x in http_request(port, "GET", "/sdapi/v1/latent-upscale-modes", headers=auth).json()
    ]
    upscalers[1:1] = latent
    assert upscalers[0] == "None"
    assert [
        x["name"] for x in http_request(port, "GET", "/sdapi/v1/schedulers", headers=auth).json()
    ]
    assert isinstance(http_request(port, "GET", "/sdapi/v1/sd-vae", headers=auth).json(), list)
    return current


def sillytavern_set_model(port: int, auth: dict[str, str], model: str) -> None:
    resp = http_request(
        port, "POST", "/sdapi/v1/options", {"sd_model_checkpoint": model}, headers=auth
    )
    assert resp.status == 200
    for _ in range(10):
        state = http_request(port, "GET", "/sdapi/v1/progress", headers=auth).json()
        if state["progress"] == 0.0 and state["state"]["job_count"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError("never idle")


def sillytavern_body(port: int, auth: str, prompt: str, steps: int = 20) -> dict[str, Any]:
    """generateAutoImage's body with SillyTavern's default settings (seed -1 is left out)."""
    return {
        "url": f"http://127.0.0.1:{port}",
        "auth": auth,
        "prompt": prompt,
        "negative_prompt": "lowres, bad anatomy, bad hands, text, error, cropped, worst quality",
        "sampler_name": "DDIM",
        "scheduler": "normal",
        "steps": steps,
        "cfg_scale": 7,
        "width": 512,
        "height": 512,
        "restore_faces": False,
        "enable_hr": False,
        "hr_upscaler": "Latent",
        "hr_scale": 2.0,
        "denoising_strength": 0.7,
        "hr_second_pass_steps": 0,
        "override_settings": {"CLIP_stop_at_last_layers": 1},
        "override_settings_restore_afterwards": True,
        "clip_skip": 1,
        "save_images": True,
        "send_images": True,
        "do_not_save_grid": False,
        "do_not_save_samples": False,
    }


def test_sillytavern_connects_sets_the_model_and_generates(make_server) -> None:
    server = start_with_http(make_server)
    port = server.http_port
    auth = sillytavern_auth("")  # "Basic " and nothing after: its default
    assert auth["Authorization"] == "Basic "
    model = sillytavern_connect(port, auth)
    sillytavern_set_model(port, auth, model)
    resp = http_request(
        port, "POST", "/sdapi/v1/txt2img", sillytavern_body(port, "", "a castle"), headers=auth
    )
    assert resp.status == 200, resp.body
    data = resp.json()["images"][0]  # { format: 'png', data: data.images[0] }
    assert base64.b64decode(data).startswith(b"\x89PNG")
    info = resp.json()["info"]
    assert "negative prompt" in info  # named, not silently dropped


def test_sillytavern_with_a_key_in_its_auth(make_server) -> None:
    server = start_with_http(make_server, args=["--api-key", "st-key"], start=False)
    server.start(wait=False)
    auth = sillytavern_auth("user:st-key")
    wait_until(lambda: _status(server.http_port, auth) == 200, "the keyed server")
    sillytavern_connect(server.http_port, auth)
    assert (
        http_request(
            server.http_port, "GET", "/sdapi/v1/options", headers=sillytavern_auth("")
        ).status
        == 401
    )


def _status(port: int, headers: dict[str, str]) -> int | None:
    try:
        return http_request(port, "GET", "/sdapi/v1/options", headers=headers).status
    except OSError:
        return None


def _raw_txt2img(port: int, body: dict[str, Any]) -> socket.socket:
    """A txt2img sent on a socket the caller will close without reading (a client gone)."""
    import json

    raw = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        # The Host node's fetch sends for SillyTavern's URL (plain HTTP on the loopback answers
        # loopback names only).
        f"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
        + b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(raw)}\r\n\r\n".encode()
        + raw
    )
    return sock


def _job(server: Server, prompt: str) -> dict[str, Any] | None:
    items = server.get("/jobs?limit=20").json()["items"]
    return next((i for i in items if i["params"].get("prompt") == prompt), None)


def test_a_disconnect_alone_does_not_cancel_sillytaverns_interrupt_does(make_server) -> None:
    server = start_with_http(make_server, env={"SD_SIM_STEP_SECONDS": "0.2"})
    port = server.http_port
    # A client that goes away: the job runs on to its end (AUTOMATIC1111 does the same).
    sock = _raw_txt2img(port, sillytavern_body(port, "", "left alone", steps=8))
    wait_until(lambda: _job(server, "left alone"), "the job")
    sock.close()
    job = wait_until(
        lambda: (j := _job(server, "left alone")) and j["status"] in ("COMPLETE", "CANCELED") and j,
        "the job to end",
        timeout=30,
    )
    assert job["status"] == "COMPLETE"
    # SillyTavern's generate: the browser's request closes, so it POSTs interrupt and aborts.
    sock = _raw_txt2img(port, sillytavern_body(port, "", "stopped", steps=40))
    wait_until(
        lambda: http_request(port, "GET", "/sdapi/v1/progress").json()["progress"] > 0,
        "the job to run",
    )
    stopper = threading.Thread(
        target=lambda: http_request(
            port, "POST", "/sdapi/v1/interrupt", headers=sillytavern_auth("")
        )
    )
    stopper.start()
    sock.close()
    stopper.join(10)
    wait_until(
        lambda: (j := _job(server, "stopped")) and j["status"] == "CANCELED", "the job canceled"
    )
    server.assert_serving()
