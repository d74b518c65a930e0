"""The `/sdapi/v1` handlers. Every generation is an ordinary job: submitted through the manager
(same queue, ids, listing, events and metadata as a POST of our own API), waited for on its
events, and answered in AUTOMATIC1111's shape. A client that goes away does not cancel its job
(AUTOMATIC1111 does not either); `interrupt` and `skip` do."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from sd_rest.api.a1111 import catalog
from sd_rest.api.a1111.catalog import GET_LISTS, PREFIX
from sd_rest.api.a1111.errors import DialectError, failure
from sd_rest.api.a1111.info import build_info
from sd_rest.api.a1111.request import (
    IMG2IMG,
    TXT2IMG,
    Spec,
    parse_body,
    read_fields,
    sent_fields,
)
from sd_rest.api.a1111.translate import Plan, as_422, plan_img2img, plan_txt2img
from sd_rest.api.bodies import MAX_TEXT_BYTES, clip, read_bytes, read_in_time
from sd_rest.api.common import MANAGER, OUTPUT_ROOT, Handler
from sd_rest.api.routes import _resource as add_resource
from sd_rest.api.routes import read_plain_file  # the image route's own safe read
from sd_rest.endpoints import ENDPOINTS
from sd_rest.errors import ApiError
from sd_rest.images.pngmeta import read_text
from sd_rest.jobs.manager import JobManager
from sd_rest.runs.labels import PARAMETERS_KEYWORD
from sd_rest.scripts import SEED_LIMIT
from sd_rest.state.jobs import Job, Status
from sd_rest.state.layout import Key

log = logging.getLogger(__name__)

# The jobs this dialect's callers submitted: the ones `interrupt` and `skip` end.
DIALECT_JOBS = web.AppKey("a1111_jobs", set)
_WAIT_SLICE: Final = 30.0  # seconds between two looks at a job that sends no event


def dialect(handler: Handler) -> Handler:
    """Errors in AUTOMATIC1111's shapes: its clients parse them."""

    @functools.wraps(handler)
    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except DialectError as error:
            return error.response()
        except ApiError as error:
            if error.status in (400, 415):
                return as_422(error).response()
            # With its headers: a 503's Retry-After, a 401's WWW-Authenticate.
            return failure(error.status, error.message, error.code, error.headers).response()

    return answer


def model(manager: JobManager) -> catalog.Model:
    path = manager.settings.text_to_image_model.resolve()
    return catalog.Model(path, manager.provenance.checkpoint_sha256(path))


def _check_model(manager: JobManager, name: object) -> None:
    if name is None:
        return
    if not isinstance(name, str) or not model(manager).answers_to(name):
        raise failure(400, f"model {clip(repr(name))} not found", "RuntimeError")


# --- generation ---------------------------------------------------------------------------


async def _read_json(request: web.Request) -> dict[str, Any]:
    """The body's JSON object, read as our own API reads one (408, 413, no Content-Encoding);
    a big one (base64 images) parsed in a thread."""
    timeout = request.app[MANAGER].settings.limits.body_timeout
    raw = await read_in_time(request, timeout, read_bytes)
    if len(raw) <= MAX_TEXT_BYTES:
        return parse_body(raw)
    return await asyncio.get_running_loop().run_in_executor(None, parse_body, raw)


async def _read_request(
    request: web.Request, specs: Mapping[str, Spec]
) -> tuple[dict[str, Any], frozenset[str]]:
    """(the fields after defaults, the ones the client sent)."""
    body = await _read_json(request)
    fields = read_fields(body, specs)
    overrides = fields.get("override_settings") or {}
    _check_model(request.app[MANAGER], overrides.get("sd_model_checkpoint"))
    return fields, sent_fields(body, specs)


@dialect
async def txt2img(request: web.Request) -> web.StreamResponse:
    fields, _ = await _read_request(request, TXT2IMG)
    plan = plan_txt2img(fields, secrets.randbelow(SEED_LIMIT))
    return await _generate(request, fields, plan)


@dialect
async def img2img(request: web.Request) -> web.StreamResponse:
    fields, sent = await _read_request(request, IMG2IMG)
    loop = asyncio.get_running_loop()
    seed = secrets.randbelow(SEED_LIMIT)
    plan = await loop.run_in_executor(None, plan_img2img, fields, seed, sent)
    # Echoed without the images, as AUTOMATIC1111 does.
    return await _generate(request, {**fields, "init_images": None, "mask": None}, plan)


async def _generate(request: web.Request, fields: dict[str, Any], plan: Plan) -> web.StreamResponse:
    manager = request.app[MANAGER]
    manager.check_ready(plan.endpoint)
    loop = asyncio.get_running_loop()
    inputs = await loop.run_in_executor(None, ENDPOINTS[plan.endpoint].prepare_inputs, plan.uploads)
    job = await manager.submit(plan.endpoint, plan.params, plan.uploads, inputs, plan.notes)
    for note in plan.notes:
        log.info("AUTOMATIC1111 request, job %s %s: not honoured: %s", job.endpoint, job.id, note)
    ours: set[Key] = request.app[DIALECT_JOBS]
    key = (job.endpoint, job.id)
    ours.add(key)
    try:
        await _finished(manager, job)
    finally:
        # Only running jobs are `interrupt`'s: the set holds no more than those waited for.
        ours.discard(key)
    if job.status is Status.FAILED:
        raise failure(500, job.error or "the script failed", "JobFailed")
    store = manager.store
    paths = [store.layout.image(job.endpoint, job.id, image.n) for image in job.images]
    send = bool(fields.get("send_images", True))
    encoded, infotexts = await loop.run_in_executor(
        None, encode_images, paths, store.output, request.app[OUTPUT_ROOT], send
    )
    info = build_info(
        fields,
        plan,
        [image.seed for image in job.images],
        infotexts,
        Path(job.checkpoint).stem,
        manager.provenance.checkpoint_sha256(Path(job.checkpoint)),
        job.started_at or job.created_at,
    )
    tail = {"parameters": fields, "info": json.dumps(info)}
    return await _send(request, encoded, await loop.run_in_executor(None, _dumps, tail))


async def _send(request: web.Request, images: list[bytes], tail: bytes) -> web.StreamResponse:
    """`{"images": [...], <tail>}` written an image at a time: a batch is megabytes of base64,
    and TLS encrypts what is written on the event loop; between two images other requests
    are answered. The images are base64 already (no JSON escaping to do)."""
    parts = [b'{"images":[']
    for n, data in enumerate(images):
        parts.append(b'"' if n == 0 else b',"')
        parts.append(data)
        parts.append(b'"')
    parts.append(b"],")
    parts.append(tail[1:])  # the tail's own object, without its opening brace
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = sum(len(part) for part in parts)
    await response.prepare(request)
    for part in parts:
        await response.write(part)
    await response.write_eof()
    return response


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


async def _finished(manager: JobManager, job: Job) -> None:
    """Until the job ends: its events wake us (a client gone meanwhile changes nothing)."""
    while not job.status.finished:
        await manager.events.changed(job, job.version, _WAIT_SLICE)


def encode_images(
    paths: list[Path], output: Path, root: Path, send: bool
) -> tuple[list[bytes], list[str]]:
    """Base64 (when `send`: send_images) and the `parameters` text of each PNG (in a thread: a
    batch of eight 512×512 images is megabytes of base64). The GIL is offered back after each
    image: the event loop waits for no more than one image's encoding."""
    encoded: list[bytes] = []
    infotexts: list[str] = []
    for path in paths:
        data = read_plain_file(path, output, root)
        if data is None:
            raise failure(500, f"an image of the job is missing on disk: {path.name}", "JobFailed")
        if send:
            encoded.append(base64.b64encode(data))
        infotexts.append(read_text(data, PARAMETERS_KEYWORD) or "")
        time.sleep(0)
    return encoded, infotexts


# --- interrupt, progress, options, lists --------------------------------------------------


@dialect
async def interrupt(request: web.Request) -> web.Response:
    """Ends the jobs running for this dialect's callers, as AUTOMATIC1111 stops its current
    job only: one waiting (for a worker host too) runs later, a job of our own API runs on."""
    manager = request.app[MANAGER]
    running = catalog.running(manager.runs.snapshot(), manager.queue)
    for job in catalog.interruptible(running, request.app[DIALECT_JOBS]):
        log.info("AUTOMATIC1111 interrupt: canceling job %s %s", job.endpoint, job.id)
        await manager.cancel(job)
    return web.json_response({})


@dialect
async def progress(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    running = catalog.running(manager.runs.snapshot(), manager.queue)
    return web.json_response(catalog.progress(running, manager.queue.waiting))


@dialect
async def get_options(request: web.Request) -> web.Response:
    return web.json_response(catalog.options(model(request.app[MANAGER])))


@dialect
async def set_options(request: web.Request) -> web.Response:
    """Takes the whole dict a client read back; of it, only sd_model_checkpoint means something
    here, and it must name our model."""
    fields = await _read_json(request)
    _check_model(request.app[MANAGER], fields.get("sd_model_checkpoint"))
    return web.json_response(True)


@dialect
async def sd_models(request: web.Request) -> web.Response:
    return web.json_response([model(request.app[MANAGER]).entry()])


def _constant(doc: Any) -> Handler:
    body = json.dumps(doc).encode()

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return answer


def add_dialect_routes(app: web.Application) -> None:
    app[DIALECT_JOBS] = set()
    for path, handlers in routes().items():
        add_resource(app, path, handlers)


def routes() -> dict[str, dict[str, Handler]]:
    """path -> method -> handler: every route of the dialect."""
    table: dict[str, dict[str, Handler]] = {
        f"{PREFIX}/txt2img": {"POST": txt2img},
        f"{PREFIX}/img2img": {"POST": img2img},
        f"{PREFIX}/options": {"GET": get_options, "POST": set_options},
        f"{PREFIX}/sd-models": {"GET": sd_models},
        f"{PREFIX}/progress": {"GET": progress},
        f"{PREFIX}/interrupt": {"POST": interrupt},
        f"{PREFIX}/skip": {"POST": interrupt},
        "/internal/ping": {"GET": _constant({})},
    }
    for path, doc in GET_LISTS.items():
        table[f"{PREFIX}{path}"] = {"GET": _constant(doc)}
    return table
