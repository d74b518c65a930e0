"""The aiohttp application: routes, JSON errors, optional API key; and serving it over HTTPS."""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from .errors import ApiError
from .manager import JobManager
from .routes import MANAGER, add_routes
from .uploads import MAX_UPLOAD_BYTES

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY_BYTES = 2 * MAX_UPLOAD_BYTES + 1024 * 1024  # image + mask + fields
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "too_large",
    415: "unsupported_media_type",
    429: "queue_full",
    503: "unavailable",
}
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Expose-Headers": "Location, ETag",
}


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(error.body()).encode(),
        status=error.status,
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is the same JSON shape; nothing a client sends produces a bare 500."""
    try:
        response = await handler(request)
    except ApiError as error:
        response = error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "http_error")
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 413:
            message = f"the request body is larger than {MAX_BODY_BYTES} bytes"
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        response = error_response(ApiError(exc.status, code, message), headers)
    except Exception:
        request_id = secrets.token_hex(8)
        log.exception("request %s (%s %s) failed", request_id, request.method, request.path)
        body = {
            "error": {
                "code": "internal_error",
                "message": f"internal server error; it was logged as request {request_id}",
                "requestId": request_id,
            }
        }
        response = web.Response(
            body=json.dumps(body).encode(), status=500, content_type="application/json"
        )
    response.headers.update(CORS_HEADERS)
    return response


def api_key_middleware(key: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    expected = f"Bearer {key}".encode()

    @web.middleware
    async def require_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "OPTIONS":
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise ApiError(
                    401, "unauthorized", "send the API key as 'Authorization: Bearer <key>'"
                )
        return await handler(request)

    return require_api_key


async def preflight(request: web.Request) -> web.Response:
    return web.Response(status=204)


def create_app(manager: JobManager) -> web.Application:
    middlewares = [json_errors]
    if manager.settings.api_key:
        middlewares.append(api_key_middleware(manager.settings.api_key))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[MANAGER] = manager
    add_routes(app)
    app.router.add_route("OPTIONS", "/{tail:.*}", preflight)
    return app


def ssl_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
