"""AUTOMATIC1111's options, models, samplers, progress, interrupt and connect-time lists
against a real demo server."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import replace
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from sd_rest.api.a1111.routes import DIALECT_JOBS
from sd_rest.api.app import create_app
from sd_rest.jobs.manager import JobManager

from helpers import FAST_SIMULATOR, Server, wait_until
from inprocess import settings


def post(server: Server, path: str, doc: Any = None, timeout: float = 60) -> Any:
    body = None if doc is None else json.dumps(doc).encode()
    return server.request("POST", path, body, {"Content-Type": "application/json"}, timeout)


def test_options_name_the_model_and_take_back_what_was_read(shared_server: Server) -> None:
    options = shared_server.get("/sdapi/v1/options").json()
    (model,) = shared_server.get("/sdapi/v1/sd-models").json()
    assert options["sd_model_checkpoint"] == model["title"]
    assert options["sd_checkpoint_hash"] == model["sha256"] and options["samples_format"] == "png"
    assert model["title"] == f"text-to-image.ckpt [{model['sha256'][:10]}]"
    assert model["filename"] == "text-to-image.ckpt" and model["model_name"] == "text-to-image"
    assert post(shared_server, "/sdapi/v1/options", options).json() is True
    for name in (model["title"], model["model_name"], model["hash"]):
        assert post(shared_server, "/sdapi/v1/options", {"sd_model_checkpoint": name}).status == 200
    refused = post(shared_server, "/sdapi/v1/options", {"sd_model_checkpoint": "sdxl.safetensors"})
    assert refused.status == 400
    assert refused.json()["error"] == "RuntimeError" and "sdxl" in refused.json()["detail"]
    bad = post(
        shared_server,
        "/sdapi/v1/txt2img",
        {"prompt": "x", "override_settings": {"sd_model_checkpoint": "other"}},
    )
    assert bad.status == 400 and set(bad.json()) == {"error", "detail", "body", "errors"}


def test_the_lists_are_small_and_true(shared_server: Server) -> None:
    names = [s["name"] for s in shared_server.get("/sdapi/v1/samplers").json()]
    assert names == ["DDIM", "PLMS"]
    assert shared_server.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    for path in ("sd-vae", "loras", "latent-upscale-modes"):
        assert shared_server.get(f"/sdapi/v1/{path}").json() == []
    assert [u["name"] for u in shared_server.get("/sdapi/v1/upscalers").json()] == ["None"]
    assert shared_server.get("/sdapi/v1/schedulers").json()[0]["name"]
    assert shared_server.get("/internal/ping").json() == {}


def test_progress_idle_running_and_interrupt(make_server) -> None:
    server = make_server(args=["--concurrency", "2"], env={"SD_SIM_STEP_SECONDS": "0.3"})
    idle = server.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    answers: list[Any] = []
    call = threading.Thread(
        target=lambda: answers.append(
            post(server, "/sdapi/v1/txt2img", {"prompt": "slow", "steps": 30, "seed": 1})
        )
    )
    call.start()
    running = wait_until(
        lambda: (doc := server.get("/sdapi/v1/progress").json())["progress"] > 0 and doc,
        "progress to move",
    )
    assert running["state"]["job_count"] == 1 and running["state"]["sampling_steps"] == 30
    assert 0 < running["state"]["sampling_step"] <= 30 and running["eta_relative"] > 0
    # A job of our own API, running beside it, is not this dialect's to interrupt.
    native = server.post_form("text-to-image", {"prompt": "ours", "steps": "12"})
    url = native.headers["Location"]
    server.wait_status(url, {"IN_PROGRESS"})
    assert server.get("/sdapi/v1/progress").json()["state"]["job_count"] == 2
    assert post(server, "/sdapi/v1/interrupt").json() == {}
    call.join(30)
    assert answers[0].status == 200  # interrupted: the images it had (none yet)
    assert server.get(url).json()["status"] == "IN_PROGRESS"
    items = server.get("/jobs?endpoint=text-to-image&limit=5").json()["items"]
    by_prompt = {i["params"]["prompt"]: i["status"] for i in items}
    assert by_prompt["slow"] == "CANCELED"
    assert server.wait_status(url, {"COMPLETE", "CANCELED", "FAILED"})["status"] == "COMPLETE"
    assert server.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_the_dialects_jobs_are_forgotten_once_finished(tmp_path, monkeypatch) -> None:
    """The set `interrupt` reads holds the jobs callers wait for, not every job ever made."""
    for name, value in FAST_SIMULATOR.items():
        monkeypatch.setenv(name, value)

    async def scenario() -> None:
        manager = JobManager(replace(settings(tmp_path / "output"), runner="process"))
        await manager.start(manager.recover())
        app = create_app(manager)
        try:
            async with TestClient(TestServer(app)) as client:
                for n in range(3):
                    body = {"prompt": f"forgotten {n}", "steps": 2, "width": 256, "height": 256}
                    resp = await client.post("/sdapi/v1/txt2img", json=body)
                    assert resp.status == 200, await resp.text()
                    assert len((await resp.json())["images"]) == 1
                assert app[DIALECT_JOBS] == set()
        finally:
            await manager.shutdown()

    asyncio.run(scenario())
