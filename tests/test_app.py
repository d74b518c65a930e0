"""The aiohttp app in process (aiohttp's test client): CORS and nosniff on every kind of
response, streamed ones included; one JSON error shape; the API key."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sd_rest.api.app import create_app
from sd_rest.api.common import COMMON_HEADERS
from sd_rest.jobs.manager import JobManager

from inprocess import settings


async def streamed(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"data: one\n\n")
    return response


async def broken(request: web.Request) -> web.Response:
    raise RuntimeError("secret /srv/path in the message")


def run_with_client(tmp_path: Path, check, **changes: object) -> None:
    async def scenario() -> None:
        manager = JobManager(settings(tmp_path / "output", **changes))
        app = create_app(manager)
        app.router.add_get("/test/stream", streamed)
        app.router.add_get("/test/broken", broken)
        async with TestClient(TestServer(app)) as client:
            await check(client)

    asyncio.run(scenario())


def has_cors(response: object) -> bool:
    headers = response.headers  # type: ignore[attr-defined]
    return all(headers.get(name) == value for name, value in COMMON_HEADERS.items())


def test_every_kind_of_response_carries_cors_and_nosniff(tmp_path: Path) -> None:
    async def check(client: TestClient) -> None:
        answers = {
            "index": await client.get("/"),
            "stream": await client.get("/test/stream"),
            "404": await client.get("/nowhere"),
            "405": await client.put("/text-to-image"),
            "400": await client.post("/text-to-image", json={"prompt": ""}),
            "preflight": await client.options("/text-to-image"),
            "500": await client.get("/test/broken"),
        }
        assert {name: r.status for name, r in answers.items()} == {
            "index": 200,
            "stream": 200,
            "404": 404,
            "405": 405,
            "400": 400,
            "preflight": 204,
            "500": 500,
        }
        assert [name for name, r in answers.items() if not has_cors(r)] == []
        assert await answers["stream"].read() == b"data: one\n\n"

    run_with_client(tmp_path, check)


def test_an_internal_error_is_json_with_a_request_id_and_no_details(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def check(client: TestClient) -> None:
        with caplog.at_level(logging.ERROR):
            response = await client.get("/test/broken")
        error = (await response.json())["error"]
        assert error["code"] == "internal_error"
        assert "/srv/path" not in error["message"]
        assert error["requestId"] in error["message"]
        assert any(error["requestId"] in r.getMessage() and r.exc_info for r in caplog.records)

    run_with_client(tmp_path, check)


def test_the_api_key_guards_every_path_but_preflights(tmp_path: Path) -> None:
    async def check(client: TestClient) -> None:
        for path in ("/", "/nowhere", "/test/stream"):
            refused = await client.get(path)
            assert refused.status == 401 and has_cors(refused)
            assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await client.options("/text-to-image")).status == 204
        allowed = await client.get("/", headers={"Authorization": "Bearer s3cret"})
        assert allowed.status == 200
        wrong = await client.get("/", headers={"Authorization": "Bearer s3cre"})
        assert wrong.status == 401

    run_with_client(tmp_path, check, api_key="s3cret")
