"""HTTP handlers: parse the request, hand it to the manager, answer with status JSON."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from aiohttp.web_request import FileField

from . import __version__
from .endpoints import ENDPOINTS, IMAGE_TO_IMAGE, INPAINT_IMAGE
from .errors import ApiError
from .jobs import Job
from .manager import JobManager
from .uploads import prepare_init_image, prepare_inpaint

MANAGER = web.AppKey("manager", JobManager)
ID_PATTERN = "{id:[0-9a-f]{32}}"
IMAGE_PATTERN = "{n:[1-9][0-9]{0,5}}.png"
BODY_TIMEOUT = 120.0  # seconds to receive a whole request body
IMAGE_CACHE_CONTROL = "public, max-age=31536000, immutable"  # a finished image never changes


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    for endpoint in ENDPOINTS:
        app.router.add_post(f"/{endpoint}", submit)
        app.router.add_get(f"/{endpoint}/{ID_PATTERN}", status)
        app.router.add_delete(f"/{endpoint}/{ID_PATTERN}", cancel)
        app.router.add_get(f"/{endpoint}/{ID_PATTERN}/{IMAGE_PATTERN}", image)


def _endpoint(request: web.Request) -> str:
    # The first path segment is one of ENDPOINTS: the router only matched those.
    return request.path.split("/", 2)[1]


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
    }
    return json_response(json.dumps(doc).encode())


async def status(request: web.Request) -> web.Response:
    job = await _job(request)
    return json_response(job.status_body())


async def _job(request: web.Request) -> Job:
    endpoint, id_ = _endpoint(request), request.match_info["id"]
    job = await request.app[MANAGER].get(endpoint, id_)
    if job is None:
        raise ApiError(404, "not_found", f"no {endpoint} job with id {id_}")
    return job


async def cancel(request: web.Request) -> web.Response:
    job = await _job(request)
    await request.app[MANAGER].cancel(job)
    return json_response(job.status_body())


async def image(request: web.Request) -> web.StreamResponse:
    job = await _job(request)
    n = int(request.match_info["n"])
    record = job.image(n)
    if record is None:
        raise ApiError(404, "not_found", f"job {job.id} has no image {n}")
    etag = f'"{record.sha256}"'
    headers = {"ETag": etag, "Cache-Control": IMAGE_CACHE_CONTROL}
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    path = request.app[MANAGER].store.image_path(job, n)
    data = await asyncio.get_running_loop().run_in_executor(None, _read_regular_file, path)
    if data is None:
        raise ApiError(404, "not_found", f"image {n} of job {job.id} is missing on disk")
    return web.Response(body=data, content_type="image/png", headers=headers)


def _read_regular_file(path: Any) -> bytes | None:
    """Never follow a link out of the output folder: only a plain file is served."""
    try:
        if not path.is_file() or path.is_symlink():
            return None
        return path.read_bytes()
    except OSError:
        return None


async def submit(request: web.Request) -> web.Response:
    from .validation import validate_params

    endpoint = _endpoint(request)
    manager = request.app[MANAGER]
    manager.check_ready(endpoint)
    try:
        fields, files = await asyncio.wait_for(_read_body(request), BODY_TIMEOUT)
    except asyncio.TimeoutError as exc:
        raise ApiError(408, "timeout", "the request body took too long to arrive") from exc
    params = validate_params(endpoint, fields, list(files))
    inputs = await asyncio.get_running_loop().run_in_executor(
        None, _prepare_inputs, endpoint, files
    )
    job = await manager.submit(endpoint, params, files, inputs)
    return json_response(job.status_body(), status=303, headers={"Location": job.result_url})


def _prepare_inputs(endpoint: str, files: dict[str, bytes]) -> dict[str, bytes]:
    if endpoint == IMAGE_TO_IMAGE:
        return {"image": prepare_init_image(files["image"])}
    if endpoint == INPAINT_IMAGE:
        image, mask = prepare_inpaint(files["image"], files["mask"])
        return {"image": image, "mask": mask}
    return {}


async def _read_body(request: web.Request) -> tuple[list[tuple[str, object]], dict[str, bytes]]:
    """(text fields in order, uploaded files) from multipart, url-encoded or JSON bodies."""
    content_type = request.content_type
    if content_type == "application/json":
        try:
            data = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_json", "the JSON body must be an object of fields")
        return list(data.items()), {}
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.post()
        except ValueError as exc:
            raise ApiError(400, "invalid_body", f"the form could not be read: {exc}") from exc
        fields: list[tuple[str, object]] = []
        files: dict[str, bytes] = {}
        for name, value in form.items():
            if isinstance(value, FileField):
                if name in files:
                    raise ApiError(400, "duplicate_field", f"{name} was sent more than once", name)
                files[name] = value.file.read()
            else:
                fields.append((name, value))
        return fields, files
    if not request.body_exists:
        return [], {}
    raise ApiError(
        415,
        "unsupported_media_type",
        f"send multipart/form-data, application/x-www-form-urlencoded or application/json, "
        f"not {content_type}",
    )
