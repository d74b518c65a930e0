"""Request bodies to fields and files, by our own code rather than `request.post()`, so that
every limit is ours and every refusal names its field: a size limit per text field and per file
(413), a bound on the number of parts, strict UTF-8, and any parsing failure of hostile bytes
as a 400.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final, TypeVar
from urllib.parse import unquote_to_bytes

from aiohttp import BodyPartReader, web

from sd_rest.errors import ApiError, invalid
from sd_rest.images.uploads import MAX_UPLOAD_BYTES

Fields = list[tuple[str, object]]  # text fields in arrival order
Files = list[tuple[str, bytes]]  # uploaded files in arrival order

MAX_TEXT_BYTES: Final = 64 * 1024  # one text field, or a whole JSON or url-encoded body
MAX_PARTS: Final = 32  # fields and files of one request; the largest valid one has 10
MAX_BODY_BYTES: Final = 2 * MAX_UPLOAD_BYTES + 1024 * 1024  # image + mask + fields
_READ_CHUNK: Final = 256 * 1024
_UTF8_CHARSETS: Final = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
_IDENTITY: Final = frozenset({"", "identity"})
_PLAIN_TRANSFER: Final = frozenset({"", "binary", "8bit", "7bit"})
_SHOWN_ERROR: Final = 200  # characters of a parser's message quoted back to the client
_MAX_INT_DIGITS: Final = 100  # a longer JSON integer is out of every range

T = TypeVar("T")


async def read_in_time(
    request: web.Request, timeout: float, read: Callable[[web.Request], Awaitable[T]]
) -> T:
    """`read(request)`, or a 408 when the body has not arrived within `timeout` seconds."""
    try:
        return await asyncio.wait_for(read(request), timeout)
    except asyncio.TimeoutError as exc:
        raise ApiError(
            408, "timeout", f"the request body did not arrive within {timeout:g} s"
        ) from exc


def _check_identity(request: web.Request) -> None:
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in _IDENTITY:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"compressed bodies are not accepted (Content-Encoding {clip(encoding)!r})",
        )


async def read_bytes(request: web.Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The whole body, uncompressed, at most `limit` bytes (413 beyond)."""
    _check_identity(request)
    return await _read_all(request, limit)


async def read_body(request: web.Request) -> tuple[Fields, Files]:
    """(text fields, files) from a multipart, url-encoded or JSON body; ([], []) for none."""
    _check_identity(request)
    content_type = request.content_type
    if content_type == "multipart/form-data":
        return await _read_multipart(request)
    if content_type == "application/x-www-form-urlencoded":
        if (request.charset or "utf-8").lower() not in _UTF8_CHARSETS:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"url-encoded forms must be UTF-8, not {clip(str(request.charset))!r}",
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
        f"not {clip(content_type)}",
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
        raise invalid(name, f"{name} must be UTF-8 text, not {clip(charset)!r}")
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
        data = load_json(body, keep_pairs)
    except ValueError as exc:
        raise ApiError(
            400, "invalid_json", f"the body is not valid JSON: {clip(str(exc))}"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the JSON body must be an object of fields")
    return objects[-1]


def load_json(body: bytes, object_pairs_hook: Callable[[Any], Any] | None = None) -> Any:
    """`json.loads` for a client's bytes, every failure a ValueError (a JSONDecodeError with its
    `pos` for bad syntax): nesting deep enough to exhaust the recursion limit, an integer of
    more than 100 digits, bytes that are not UTF-8."""
    try:
        return json.loads(body, object_pairs_hook=object_pairs_hook, parse_int=_json_int)
    except RecursionError:
        raise ValueError("nested too deeply for this server") from None


def _json_int(text: str) -> int:
    # Python refuses over 4300 digits with an error about its own settings; say it plainly.
    if len(text) > _MAX_INT_DIGITS:
        raise ValueError(f"a number has {len(text)} digits")
    return int(text)


def first_line(text: str) -> str:
    """The first non-blank line of a parser's message, clipped, without a trailing colon."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return clip(lines[0].rstrip(":").strip()) if lines else ""


def clip(text: str) -> str:
    return text if len(text) <= _SHOWN_ERROR else text[:_SHOWN_ERROR] + "…"
