"""HTTP handlers: read the request, hand it to the manager, answer with status JSON.

Request bodies are read here by hand rather than with `request.post()`, so that every limit is
ours and every refusal names its field: a size limit per text field and per file (413), a bound
on the number of parts, strict UTF-8, and any parsing failure of hostile bytes as a 400.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import unquote_to_bytes

from aiohttp import BodyPartReader, HttpVersion11, web

from . import __version__
from .endpoints import ENDPOINTS, IMAGE_TO_IMAGE, INPAINT_IMAGE
from .errors import ApiError, invalid
from .jobs import Job
from .manager import JobManager
from .uploads import MAX_UPLOAD_BYTES, prepare_init_image, prepare_inpaint
from .validation import validate_params

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Fields = list[tuple[str, object]]  # text fields in arrival order
Files = list[tuple[str, bytes]]  # uploaded files in arrival order

ID_PATTERN: Final = "{id:[0-9a-f]{32}}"
IMAGE_PATTERN: Final = "{n:[1-9][0-9]{0,5}}.png"
IMAGE_CACHE_CONTROL: Final = "public, max-age=31536000, immutable"  # a finished image never changes
MAX_TEXT_BYTES: Final = 64 * 1024  # one text field, or a whole JSON or url-encoded body
MAX_PARTS: Final = 32  # fields and files of one request; the largest valid one has 10
MAX_BODY_BYTES: Final = 2 * MAX_UPLOAD_BYTES + 1024 * 1024  # image + mask + fields
_READ_CHUNK: Final = 256 * 1024
_UTF8_CHARSETS: Final = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
_IDENTITY: Final = frozenset({"", "identity"})
_PLAIN_TRANSFER: Final = frozenset({"", "binary", "8bit", "7bit"})
_SHOWN_ERROR: Final = 200  # characters of a parser's message quoted back to the client

CORS_HEADERS: Final = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Expose-Headers": "Location, ETag",
}


@dataclass(frozen=True)
class Limits:
    """Time limits on slow clients (seconds)."""

    # From connecting (or from the previous response) to the end of a request's headers; also
    # how long an idle keep-alive connection stays open. aiohttp has one timer for both.
    header_timeout: float = 30.0
    body_timeout: float = 120.0  # to receive a whole POST body


MANAGER = web.AppKey("manager", JobManager)
LIMITS = web.AppKey("limits", Limits)
OUTPUT_ROOT = web.AppKey("output_root", Path)  # the output folder with every link resolved


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(error.body()).encode(),
        status=error.status,
        content_type="application/json",
        headers=headers,
    )


def add_routes(app: web.Application) -> None:
    """Every route, each path with an open OPTIONS for CORS preflights.

    Methods are added per resource so that a wrong method is a 405 and an unknown path a 404.
    """
    _resource(app, "/", {"GET": index})
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


def _resource(app: web.Application, path: str, handlers: dict[str, Handler]) -> None:
    resource = app.router.add_resource(path)
    for method, handler in handlers.items():
        resource.add_route(method, handler, expect_handler=expect_continue)
        if method == "GET":
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
        error = ApiError(417, "expectation_failed", f"unsupported Expect header {_clip(expect)!r}")
        return error_response(error, CORS_HEADERS)
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
    }
    return json_response(json.dumps(doc).encode())


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
        return json_response(job.status_body())

    return status


def _cancel_handler(endpoint: str) -> Handler:
    async def cancel(request: web.Request) -> web.Response:
        job = await _job(request, endpoint)
        await request.app[MANAGER].cancel(job)
        return json_response(job.status_body())

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
        path = store.image_path(job, n)
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
        timeout = request.app[LIMITS].body_timeout
        try:
            fields, files = await asyncio.wait_for(read_body(request), timeout)
        except asyncio.TimeoutError as exc:
            raise ApiError(
                408, "timeout", f"the request body did not arrive within {timeout:g} s"
            ) from exc
        params = validate_params(endpoint, fields, [name for name, _ in files])
        uploads = dict(files)  # validation refused any name sent twice
        inputs = await asyncio.get_running_loop().run_in_executor(
            None, _prepare_inputs, endpoint, uploads
        )
        job = await manager.submit(endpoint, params, uploads, inputs)
        return json_response(job.status_body(), status=303, headers={"Location": job.result_url})

    return submit


def _prepare_inputs(endpoint: str, files: dict[str, bytes]) -> dict[str, bytes]:
    if endpoint == IMAGE_TO_IMAGE:
        return {"image": prepare_init_image(files["image"])}
    if endpoint == INPAINT_IMAGE:
        image, mask = prepare_inpaint(files["image"], files["mask"])
        return {"image": image, "mask": mask}
    return {}


async def read_body(request: web.Request) -> tuple[Fields, Files]:
    """(text fields, files) from a multipart, url-encoded or JSON body; ([], []) for none."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in _IDENTITY:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"compressed bodies are not accepted (Content-Encoding {_clip(encoding)!r})",
        )
    content_type = request.content_type
    if content_type == "multipart/form-data":
        return await _read_multipart(request)
    if content_type == "application/x-www-form-urlencoded":
        if (request.charset or "utf-8").lower() not in _UTF8_CHARSETS:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"url-encoded forms must be UTF-8, not {_clip(str(request.charset))!r}",
            )
        return parse_urlencoded(await _read_all(request, MAX_TEXT_BYTES)), []
    if content_type == "application/json":
        return parse_json(await _read_all(request, MAX_TEXT_BYTES)), []
    if not request.body_exists:
        return [], []
    raise ApiError(
        415,
        "unsupported_media_type",
        "send multipart/form-data, application/x-www-form-urlencoded or application/json, "
        f"not {_clip(content_type)}",
    )


def _too_large(limit: int, field: str | None = None) -> ApiError:
    what = f"{field} is" if field else "the request body is"
    return ApiError(413, "too_large", f"{what} larger than {limit} bytes", field)


def _check_length(request: web.Request, limit: int) -> None:
    """Refuse a declared oversized body before reading any of it."""
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)


async def _read_all(request: web.Request, limit: int) -> bytes:
    _check_length(request, limit)
    data = bytearray()
    with _malformed("body"):
        while chunk := await request.content.read(_READ_CHUNK):
            data += chunk
            if len(data) > limit:
                raise _too_large(limit)
    return bytes(data)


@contextmanager
def _malformed(what: str) -> Iterator[None]:
    """A failure of aiohttp's parsers on the client's bytes is the client's malformed body.

    A lost connection (OSError) is not: it is passed on, as are our own errors.
    """
    try:
        yield
    except (ApiError, web.HTTPException, OSError):
        raise
    except Exception as exc:
        # aiohttp's HTTP errors print as "400, message:\n  <what>": their message is the part.
        detail = getattr(exc, "message", None)
        message = first_line(detail if isinstance(detail, str) else str(exc))
        raise ApiError(
            400, "invalid_body", f"the {what} could not be read: {message or type(exc).__name__}"
        ) from exc


async def _read_multipart(request: web.Request) -> tuple[Fields, Files]:
    _check_length(request, MAX_BODY_BYTES)
    fields: Fields = []
    files: Files = []
    with _malformed("multipart body"):
        reader = await request.multipart()
    while True:
        with _malformed("multipart body"):
            part = await reader.next()
        if part is None:
            return fields, files
        if len(fields) + len(files) >= MAX_PARTS:
            raise ApiError(
                400, "too_many_fields", f"a request has at most {MAX_PARTS} fields and files"
            )
        if not isinstance(part, BodyPartReader):
            raise ApiError(400, "invalid_body", "nested multipart bodies are not accepted")
        name = part.name
        if not name:
            raise ApiError(400, "invalid_body", "every multipart part needs a name")
        _check_part_encoding(part, name)
        if part.filename is None:
            data = await _read_part(request, part, name, MAX_TEXT_BYTES)
            fields.append((name, _part_text(part, name, data)))
        else:
            files.append((name, await _read_part(request, part, name, MAX_UPLOAD_BYTES)))


def _check_part_encoding(part: BodyPartReader, name: str) -> None:
    # Sent as is, an encoded prompt would silently become a prompt of base64 text.
    transfer = part.headers.get("Content-Transfer-Encoding", "").strip().lower()
    encoding = part.headers.get("Content-Encoding", "").strip().lower()
    if transfer not in _PLAIN_TRANSFER or encoding not in _IDENTITY:
        raise invalid(name, f"{name} must be sent as plain bytes, without a transfer encoding")


async def _read_part(request: web.Request, part: BodyPartReader, name: str, limit: int) -> bytes:
    data = bytearray()
    while True:
        with _malformed("multipart body"):
            chunk = await part.read_chunk(_READ_CHUNK)
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > limit:
            raise _too_large(limit, name)
        if request.content.total_bytes > MAX_BODY_BYTES:
            raise _too_large(MAX_BODY_BYTES)


def _part_text(part: BodyPartReader, name: str, data: bytes) -> str:
    charset = (part.get_charset("utf-8") or "utf-8").lower()
    if charset not in _UTF8_CHARSETS:
        raise invalid(name, f"{name} must be UTF-8 text, not {_clip(charset)!r}")
    return _utf8(name, data)


def _utf8(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(
            name, f"{name} is not valid UTF-8 text (bad byte at position {exc.start})"
        ) from None


def parse_urlencoded(body: bytes) -> Fields:
    """`name=value&…` pairs, '+' as space, percent-decoded, strictly UTF-8; blanks are kept."""
    fields: Fields = []
    for piece in body.split(b"&"):
        if not piece:
            continue
        if len(fields) >= MAX_PARTS:
            raise ApiError(400, "too_many_fields", f"a request has at most {MAX_PARTS} fields")
        raw_name, _, raw_value = piece.partition(b"=")
        try:
            name = _form_decode(raw_name).decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "invalid_body", "a field name is not valid UTF-8") from None
        fields.append((name, _utf8(name, _form_decode(raw_value))))
    return fields


def _form_decode(raw: bytes) -> bytes:
    return unquote_to_bytes(raw.replace(b"+", b" "))


def parse_json(body: bytes) -> Fields:
    """The members of a JSON object in order, duplicates kept (validation refuses them)."""
    objects: list[list[tuple[str, object]]] = []

    def keep_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
        objects.append(pairs)  # the outermost object is completed, so appended, last
        return dict(pairs)

    try:
        data = json.loads(body, object_pairs_hook=keep_pairs, parse_int=_json_int)
    except RecursionError:
        raise ApiError(400, "invalid_json", "the JSON body is nested too deeply") from None
    except ValueError as exc:
        raise ApiError(
            400, "invalid_json", f"the body is not valid JSON: {_clip(str(exc))}"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the JSON body must be an object of fields")
    return objects[-1]


def _json_int(text: str) -> int:
    # Python refuses over 4300 digits with an error about its own settings; say it plainly.
    if len(text) > 100:
        raise ValueError(f"a number has {len(text)} digits")
    return int(text)


def first_line(text: str) -> str:
    """The first non-blank line of a parser's message, clipped, without a trailing colon."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return _clip(lines[0].rstrip(":").strip()) if lines else ""


def _clip(text: str) -> str:
    return text if len(text) <= _SHOWN_ERROR else text[:_SHOWN_ERROR] + "…"
