"""The web page: `GET /` for browsers, and its files under `/ui/`.

`GET /` answers two kinds of client. A browser, whose `Accept` asks for HTML before JSON, gets
the page; everything else (curl's `*/*`, fetch's default, a JSON client) keeps getting the JSON
index, as before. Both answers say `Vary: Accept`, so no cache hands one to the other.

The page and its files are let through by the API key check (app.py):
a browser cannot send the key to load a page, and the page holds no secret (it is the same
for everyone: plain HTML, CSS and JavaScript from `sd_rest/static/`). The page then asks for
the key and sends it with every API request itself. Everything the API serves still needs it.

The field table and each endpoint's defaults are written into the page as it is served, so the
page's forms cannot drift from what validation accepts, and it needs no request to show them;
so is whether the server wants a key, so the page asks for it at once instead of learning it
from a refused request.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from sd_rest.api.common import MANAGER, Handler
from sd_rest.endpoints import ENDPOINTS
from sd_rest.errors import ApiError
from sd_rest.fields import FIELDS, FileField, NumberField, TextField

STATIC: Final = Path(__file__).parent.parent / "static"
PREFIX: Final = "/ui/"
PAGE_ROUTE: Final = "page"
FILE_ROUTE: Final = "page-file"
PAGE: Final = "index.html"
FIELDS_MARK: Final = "/*FIELDS*/null"  # replaced by the field table in index.html
HTML_TYPES: Final = ("text/html", "application/xhtml+xml")
CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Only this server's own files run in the page; images come from the API as blobs when a key
# is needed (an <img> cannot send it); nothing may frame the page.
PAGE_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load (the ETag makes that cheap): an upgraded server shows its page.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


def prefers_html(accept: str) -> bool:
    """Whether an Accept header asks for HTML at least as much as for JSON. A wildcard counts
    for neither: `*/*` (curl, fetch) keeps getting JSON."""
    html = json_q = 0.0
    for part in accept.split(","):
        media, *options = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for option in options:
            name, _, value = option.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.lower()
        if media in HTML_TYPES:
            html = max(html, quality)
        elif media == "application/json":
            json_q = max(json_q, quality)
    return html > 0 and html >= json_q


def page_data(key_required: bool) -> dict[str, Any]:
    """What the page is built from: every field's kind and range, each endpoint's fields in
    order with their defaults (None: required) and its uploads, and whether a key is needed."""
    fields: dict[str, dict[str, Any]] = {}
    for name, field in FIELDS.items():
        if isinstance(field, NumberField):
            fields[name] = {
                "kind": "int" if field.kind is int else "float",
                "low": field.low,
                "high": field.high,
                "openInterval": field.open_interval,
                "multiple": field.multiple,
                "description": field.description,
            }
        elif isinstance(field, TextField):
            fields[name] = {
                "kind": "text",
                "maxLength": field.max_length,
                "description": field.description,
            }
        elif isinstance(field, FileField):
            fields[name] = {"kind": "file", "description": field.description}
    endpoints = {
        name: {"defaults": dict(endpoint.defaults), "files": list(endpoint.files)}
        for name, endpoint in ENDPOINTS.items()
    }
    return {"fields": fields, "endpoints": endpoints, "keyRequired": key_required}


def _static(body: bytes, content_type: str) -> StaticFile:
    return StaticFile(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


@cache
def static_files() -> dict[str, StaticFile]:
    """Every file of the page, read once: only these names are ever served (no path is
    joined from a request, so nothing else can be reached)."""
    files = {}
    for path in sorted(STATIC.iterdir()):
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is not None and path.is_file():
            files[path.name] = _static(path.read_bytes(), content_type)
    return files


@cache
def page(key_required: bool) -> StaticFile:
    """index.html with its data filled in."""
    template = static_files()[PAGE]
    # In a JSON data block: "<" escaped so no value can end the script element.
    data = json.dumps(page_data(key_required), separators=(",", ":")).replace("<", "\\u003c")
    return _static(
        template.body.replace(FIELDS_MARK.encode(), data.encode()), template.content_type
    )


def serve(request: web.Request, name: str) -> web.Response:
    if name == PAGE:
        file: StaticFile | None = page(bool(request.app[MANAGER].settings.api_key))
    else:
        file = static_files().get(name)
    if file is None:
        raise ApiError(404, "not_found", f"nothing at {request.path[:200]}")
    headers = {**PAGE_HEADERS, "ETag": file.etag}
    if name == PAGE:
        headers["Vary"] = "Accept"
    if file.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=file.body, headers={**headers, "Content-Type": file.content_type})


def wants_page(request: web.Request) -> bool:
    """A browser asking for `/`: it gets the page, a JSON client the index."""
    return request.method in ("GET", "HEAD") and prefers_html(request.headers.get("Accept", ""))


def or_page(json_index: Handler) -> Handler:
    """`GET /`: the page for browsers, the JSON index (with `Vary: Accept`) for the rest."""

    async def index(request: web.Request) -> web.StreamResponse:
        if wants_page(request):
            return serve(request, PAGE)
        response = await json_index(request)
        response.headers["Vary"] = "Accept"
        return response

    return index


async def page_file(request: web.Request) -> web.Response:
    return serve(request, request.match_info.get("file") or PAGE)


def add_page_routes(app: web.Application) -> None:
    """`/ui/` (the page) and `/ui/<file>`: routes the API key check lets through (OPEN_ROUTES,
    docs.py), as it does a browser's `GET /`. Routes rather than a middleware in front of
    every request: the status GET's hot path goes through no layer of the page's."""
    for path, name in ((PREFIX, PAGE_ROUTE), (PREFIX + "{file}", FILE_ROUTE)):
        resource = app.router.add_resource(path, name=name)
        resource.add_route("GET", page_file)
        resource.add_route("HEAD", page_file)
