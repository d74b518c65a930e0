"""GET /openapi.json and GET /docs: the API's description, and a page to read and try it.

The page is three small files of our own in `sd_rest/static/docs/` (no framework, nothing from
a CDN), so it works offline. It is open without the API key, since a browser cannot send a
header when it opens a page: it holds nothing but those constant files, and asks for the key
to fetch /openapi.json and to try requests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

from aiohttp import web

from sd_rest import __version__
from sd_rest.api.common import DOC_ASSETS
from sd_rest.api.openapi import build_document

# A folder of its own: the web page at / serves every file directly in static/ (page.py).
STATIC: Final = Path(__file__).parent.parent / "static" / "docs"
DOC_HEADERS: Final = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # Only our own files, and requests to this server: the page never loads anything else.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' blob: data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
}
OPENAPI_BODY: Final = web.AppKey("openapi_body", bytes)


def asset_file(path: str) -> Path:
    name = path.removeprefix("/docs").lstrip("/") or "index.html"
    return STATIC / name


def route_name(path: str) -> str:
    """/docs -> docs, /docs/docs.js -> docs-docs.js (aiohttp's names allow no slash)."""
    return "docs" + path.removeprefix("/docs").replace("/", "-")


OPEN_ROUTES: Final = frozenset(route_name(path) for path in DOC_ASSETS)


def openapi_body(api_key: bool) -> bytes:
    return json.dumps(build_document(__version__, api_key), indent=1).encode()


async def openapi(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[OPENAPI_BODY],
        content_type="application/json",
        headers={"Cache-Control": "no-cache"},
    )


def asset_handler(path: str) -> web.Handler:
    """Serves one file of the page, read once when the app is made (they are small)."""
    content_type, _ = DOC_ASSETS[path]
    body = asset_file(path).read_bytes()

    async def asset(request: web.Request) -> web.Response:
        return web.Response(
            body=body, content_type=content_type, charset="utf-8", headers=DOC_HEADERS
        )

    return asset
