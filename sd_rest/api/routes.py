"""HTTP handlers: read the request (bodies.py), hand it to the manager, answer with status
JSON."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from pathlib import Path

from aiohttp import HttpVersion11, web

from sd_rest import __version__
from sd_rest.api.bodies import clip, read_body, read_in_time
from sd_rest.api.common import (
    CURSOR_KEY,
    ID_PATTERN,
    IMAGE_CACHE_CONTROL,
    IMAGE_PATTERN,
    INDEX_ROUTE,
    MANAGER,
    OUTPUT_ROOT,
    STREAM_ROUTES,
    TOKEN_KEY,
    Handler,
    error_response,
)
from sd_rest.api.docs import (
    DOC_ASSETS,
    OPENAPI_BODY,
    asset_handler,
    openapi,
    openapi_body,
    route_name,
)
from sd_rest.api.page import add_page_routes, or_page
from sd_rest.api.streams import HUB, stream
from sd_rest.api.tokens import make_token
from sd_rest.api.validation import validate_params
from sd_rest.endpoints import ENDPOINTS
from sd_rest.errors import ApiError
from sd_rest.jobs.listing import list_jobs, parse_query
from sd_rest.state.items import iso_time
from sd_rest.state.jobs import Job


def add_routes(app: web.Application) -> None:
    """Every route, each path with an open OPTIONS for CORS preflights.

    Methods are added per resource so that a wrong method is a 405 and an unknown path a 404.
    """
    _resource(app, "/", {"GET": or_page(index)}, name=INDEX_ROUTE)
    add_page_routes(app)
    app[OPENAPI_BODY] = openapi_body(api_key=bool(app[MANAGER].settings.api_key))
    _resource(app, "/openapi.json", {"GET": openapi})
    for path in DOC_ASSETS:
        _resource(app, path, {"GET": asset_handler(path)}, name=route_name(path))
    _resource(app, "/jobs", {"GET": jobs})
    _resource(app, "/events", {"GET": all_events}, name="events")
    _resource(app, "/events/token", {"POST": stream_token})
    for endpoint in ENDPOINTS:
        _resource(app, f"/{endpoint}", {"POST": _submit_handler(endpoint)})
        _resource(
            app,
            f"/{endpoint}/{ID_PATTERN}",
            {"GET": _status_handler(endpoint), "DELETE": _cancel_handler(endpoint)},
        )
        _resource(
            app, f"/{endpoint}/{ID_PATTERN}/{IMAGE_PATTERN}", {"GET": _image_handler(endpoint)}
        )
        _resource(
            app,
            f"/{endpoint}/{ID_PATTERN}/events",
            {"GET": _events_handler(endpoint)},
            name=f"events-{endpoint}",
        )


def _resource(
    app: web.Application, path: str, handlers: dict[str, Handler], name: str | None = None
) -> None:
    resource = app.router.add_resource(path, name=name)
    for method, handler in handlers.items():
        resource.add_route(method, handler, expect_handler=expect_continue)
        if method == "GET" and name not in STREAM_ROUTES:  # a stream has no HEAD
            resource.add_route("HEAD", handler, expect_handler=expect_continue)
    resource.add_route("OPTIONS", preflight)


async def preflight(request: web.Request) -> web.Response:
    return web.Response(status=204)


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's own answer to an unknown Expect header is a plain-text 417: ours is JSON."""
    if request.version != HttpVersion11:
        return None
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        error = ApiError(417, "expectation_failed", f"unsupported Expect header {clip(expect)!r}")
        return error_response(error)
    if request.transport is not None:
        request.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    return None


def json_response(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


async def index(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    doc = {
        "name": "sd-rest",
        "version": __version__,
        "endpoints": [f"/{name}" for name in ENDPOINTS],
        "running": manager.running,
        "queued": manager.queue.waiting,
        "runner": manager.settings.runner if manager.remote is None else "remote",
        "workers": manager.workers(),
    }
    unserved = manager.unserved()
    if unserved is not None:  # --broker: the endpoints no live worker host can serve
        doc["unserved"] = unserved
    return json_response(json.dumps(doc).encode())


# --- the listing and the event streams ----------------------------------------------------


async def jobs(request: web.Request) -> web.Response:
    key = request.app[CURSOR_KEY]
    query = parse_query(request.query.items(), key)
    return json_response(await list_jobs(request.app[MANAGER], query, key))


async def all_events(request: web.Request) -> web.StreamResponse:
    return await stream(request, request.app[HUB], None)


def _events_handler(endpoint: str) -> Handler:
    async def events(request: web.Request) -> web.StreamResponse:
        job = await _job(request, endpoint)
        return await stream(request, request.app[HUB], job)

    return events


async def stream_token(request: web.Request) -> web.Response:
    """A token for `?token=` on the event streams (tokens.py): for EventSource, which cannot
    send the Authorization header this request needed."""
    token, expires = make_token(request.app[TOKEN_KEY], time.time())
    doc = {"token": token, "expiresAt": iso_time(expires), "expiresIn": expires - int(time.time())}
    return json_response(json.dumps(doc).encode(), headers={"Cache-Control": "no-store"})


# --- jobs ----------------------------------------------------------------------------------


async def _job(request: web.Request, endpoint: str) -> Job:
    id_ = request.match_info["id"]
    job = await request.app[MANAGER].get(endpoint, id_)
    if job is None:
        raise ApiError(404, "not_found", f"no {endpoint} job with id {id_}")
    return job


def _status_handler(endpoint: str) -> Handler:
    async def status(request: web.Request) -> web.Response:
        job = await _job(request, endpoint)
        return json_response(job.status_body(request.app[MANAGER].position(job)))

    return status


def _cancel_handler(endpoint: str) -> Handler:
    async def cancel(request: web.Request) -> web.Response:
        job = await _job(request, endpoint)
        manager = request.app[MANAGER]
        await manager.cancel(job)
        return json_response(job.status_body(manager.position(job)))

    return cancel


def _image_handler(endpoint: str) -> Handler:
    async def image(request: web.Request) -> web.StreamResponse:
        job = await _job(request, endpoint)
        n = int(request.match_info["n"])
        record = job.image(n)
        if record is None:
            raise ApiError(404, "not_found", f"job {job.id} has no image {n}")
        etag = f'"{record.sha256}"'
        headers = {"ETag": etag, "Cache-Control": IMAGE_CACHE_CONTROL}
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        store = request.app[MANAGER].store
        path = store.layout.image(job.endpoint, job.id, n)
        data = await asyncio.get_running_loop().run_in_executor(
            None, read_plain_file, path, store.output, request.app[OUTPUT_ROOT]
        )
        if data is None:
            raise ApiError(404, "not_found", f"image {n} of job {job.id} is missing on disk")
        return web.Response(body=data, content_type="image/png", headers=headers)

    return image


def read_plain_file(path: Path, output: Path, root: Path) -> bytes | None:
    """The bytes of `path`, a regular file under `output`, reached without following any link
    below the output folder (`root` is `output` resolved); None otherwise."""
    try:
        expected = root / path.relative_to(output)
        if path.resolve(strict=True) != expected:
            return None
        # O_NOFOLLOW: a file swapped for a link since the check is refused, not followed.
        fd = os.open(expected, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                return None
            return file.read()
    except (OSError, ValueError):
        return None


# --- submitting ----------------------------------------------------------------------------


def _submit_handler(endpoint: str) -> Handler:
    async def submit(request: web.Request) -> web.Response:
        manager = request.app[MANAGER]
        manager.check_ready(endpoint)
        timeout = manager.settings.limits.body_timeout
        fields, files = await read_in_time(request, timeout, read_body)
        params = validate_params(endpoint, fields, [name for name, _ in files])
        uploads = dict(files)  # validation refused any name sent twice
        inputs = await asyncio.get_running_loop().run_in_executor(
            None, ENDPOINTS[endpoint].prepare_inputs, uploads
        )
        job = await manager.submit(endpoint, params, uploads, inputs)
        body = job.status_body(manager.position(job))
        return json_response(body, status=303, headers={"Location": job.result_url})

    return submit
