"""What the HTTP modules share: the app's keys, the URL patterns, the headers every response
carries, and the JSON error answer. Below the handlers (routes.py), the page (page.py) and the
documents (openapi.py, docs.py), so that none of them imports another to reach these."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from aiohttp import web

from sd_rest.endpoints import ENDPOINTS
from sd_rest.errors import ApiError
from sd_rest.jobs.manager import JobManager

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ID_PATTERN: Final = "{id:[0-9a-f]{32}}"
IMAGE_PATTERN: Final = "{n:[1-9][0-9]{0,5}}.png"
IMAGE_CACHE_CONTROL: Final = "public, max-age=31536000, immutable"  # a finished image never changes

CORS_HEADERS: Final = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Last-Event-ID",
    "Access-Control-Expose-Headers": "Location, ETag",
}
# On every response, with CORS: a browser never guesses another type than the one declared
# (a JSON error or a PNG is never run as a script or a page).
COMMON_HEADERS: Final = {**CORS_HEADERS, "X-Content-Type-Options": "nosniff"}

MANAGER = web.AppKey("manager", JobManager)
OUTPUT_ROOT = web.AppKey("output_root", Path)  # the output folder with every link resolved
TOKEN_KEY = web.AppKey("token_key", bytes)  # signs event-stream tokens (tokens.py)
CURSOR_KEY = web.AppKey("cursor_key", bytes)  # signs GET /jobs cursors (cursorkey.py)
# The routes a stream token opens (api_key_middleware): the event streams, and nothing else.
INDEX_ROUTE: Final = "index"
STREAM_ROUTES: Final = frozenset({"events", *(f"events-{endpoint}" for endpoint in ENDPOINTS)})


def error_response(error: ApiError) -> web.Response:
    """The JSON answer for `error`, with the headers it carries."""
    return web.Response(
        body=json.dumps(error.body()).encode(),
        status=error.status,
        content_type="application/json",
        headers=error.headers,
    )


# The docs page's files (docs.py serves them, openapi.py describes them): path -> (content
# type, what it is); each is a file of static/docs/, `/docs` its index.html.
DOC_ASSETS: Final = {
    "/docs": ("text/html", "Interactive documentation of the API"),
    "/docs/docs.js": ("text/javascript", "The documentation page's script"),
    "/docs/docs.css": ("text/css", "The documentation page's style sheet"),
}
