"""The aiohttp application: routes, JSON errors, CORS and nosniff, the optional API key and the
limits.

Every answer a client can get is JSON in the shape of errors.ApiError, including aiohttp's own:
404/405 from the router (json_errors), 417 for Expect (routes.expect_continue), and the 400 the
HTTP parser sends for malformed requests or oversized headers, which needs a protocol class of
our own (ApiProtocol, built for each connection by `protocol_factory`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import hdrs, web

from sd_rest.api.a1111.routes import add_dialect_routes
from sd_rest.api.bodies import MAX_BODY_BYTES, first_line
from sd_rest.api.common import (
    COMMON_HEADERS,
    CORS_HEADERS,
    CURSOR_KEY,
    INDEX_ROUTE,
    MANAGER,
    OUTPUT_ROOT,
    STREAM_ROUTES,
    TOKEN_KEY,
    Handler,
    error_response,
)
from sd_rest.api.docs import OPEN_ROUTES as DOC_ROUTES
from sd_rest.api.page import FILE_ROUTE, PAGE_ROUTE, wants_page
from sd_rest.api.routes import add_routes
from sd_rest.api.streams import HUB, STREAM_PING, EventHub
from sd_rest.api.tokens import token_key, token_valid
from sd_rest.errors import ApiError
from sd_rest.jobs.manager import JobManager
from sd_rest.settings import Limits, loopback_address
from sd_rest.state.cursorkey import load_cursor_key

log = logging.getLogger(__name__)

Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

MAX_LINE_BYTES: Final = 8190  # the request line, and each header line
MAX_HEADERS: Final = 100
_SHOWN_PATH: Final = 200
_PORT: Final = re.compile(r":[0-9]{1,5}")

HTTP_CODES: Final = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "too_large",
    415: "unsupported_media_type",
    417: "expectation_failed",
    429: "queue_full",
    431: "headers_too_large",
    503: "unavailable",
    504: "timeout",
}


def internal_error(request: web.BaseRequest, exc: BaseException | None) -> web.Response:
    """A JSON 500 carrying the id under which the exception was logged."""
    request_id = secrets.token_hex(8)
    log.error(
        "request %s (%s %s) failed",
        request_id,
        request.method,
        request.path,
        exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None,
    )
    body = {
        "error": {
            "code": "internal_error",
            "message": f"internal server error; it was logged as request {request_id}",
            "requestId": request_id,
        }
    }
    return web.json_response(body, status=500)


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own HTTP errors (router 404/405, size limits) in our shape."""
    path = request.path if len(request.path) <= _SHOWN_PATH else request.path[:_SHOWN_PATH] + "…"
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    if exc.status == 404:
        message = f"nothing at {path}"
    elif exc.status == 405:
        message = f"{request.method} is not allowed on {path}; allowed: {exc.headers.get('Allow')}"
    elif exc.status == 413:
        message = f"the request body is larger than {MAX_BODY_BYTES} bytes"
    else:
        message = exc.reason
    code = HTTP_CODES.get(exc.status, "http_error")
    return error_response(ApiError(exc.status, code, message, headers=headers))


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
        response = _http_error(request, exc)
    except ConnectionError:
        # The client went away mid-request: nobody will read an answer, nothing to log.
        log.debug("client closed the connection during %s %s", request.method, request.path)
        response = error_response(ApiError(400, "disconnected", "the connection was closed"))
    except Exception as exc:
        return internal_error(request, exc)
    return response


async def add_common_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """CORS and nosniff on every response of the app, streamed ones included, as it is
    prepared."""
    response.headers.update(COMMON_HEADERS)


# Plain HTTP (--http-port) answers AUTOMATIC1111's clients, which call it from their own
# servers: like AUTOMATIC1111 without --cors-allow-origins, it sends no CORS headers, so that no
# web page a browser has open can read its answers.
PLAIN_HEADERS: Final = {k: v for k, v in COMMON_HEADERS.items() if k not in CORS_HEADERS}


def headers_for(request: web.BaseRequest) -> dict[str, str]:
    """CORS and nosniff over HTTPS; nosniff alone over plain HTTP."""
    return COMMON_HEADERS if request.secure else PLAIN_HEADERS


async def add_headers_by_transport(
    request: web.BaseRequest, response: web.StreamResponse
) -> None:
    response.headers.update(headers_for(request))


def loopback_name(host: str) -> bool:
    """Whether a Host header names the loopback: localhost (and *.localhost, which browsers
    resolve there themselves), 127.0.0.0/8 or [::1], with or without a port."""
    value = host.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or not (rest == "" or _PORT.fullmatch(rest)):
            return False
    else:
        name, colon, port = value.partition(":")
        if colon and not _PORT.fullmatch(":" + port):
            return False
        if ":" in name:
            return False
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@web.middleware
async def loopback_hosts_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """On plain HTTP bound to the loopback, a request must name the loopback in its Host:
    a web page whose own name an attacker points at 127.0.0.1 (DNS rebinding) sends its
    name, and is refused before anything else."""
    host = request.headers.get(hdrs.HOST)
    if not request.secure and host is not None and not loopback_name(host):
        error = ApiError(
            400,
            "bad_request",
            f"this plain-HTTP port answers requests for localhost, 127.0.0.1 or [::1] only, "
            f"not Host {first_line(host)!r} (protection against DNS rebinding)",
        )
        return error_response(error)
    return await handler(request)


OPEN_ROUTES: Final = DOC_ROUTES | {PAGE_ROUTE, FILE_ROUTE}


def bearer_token(value: str) -> str:
    """The token of an `Authorization: Bearer <token>` value, exactly as sent ('' for any
    other scheme or form). Only HTTP's own whitespace is taken away: spaces and tabs around
    the value (optional whitespace, RFC 9110) and the spaces after the scheme (RFC 6750:
    `"Bearer" 1*SP b64token`). Anything else, Unicode whitespace included, stays part of the
    token, so that `Bearer <key>\u00a0` is not the key."""
    scheme, _, token = value.strip(" \t").partition(" ")
    if not (scheme.isascii() and scheme.lower() == "bearer"):
        return ""
    return token.lstrip(" ")


def basic_password(value: str) -> str:
    """The password of an `Authorization: Basic <base64 of user:password>` value ('' for any
    other scheme or a value that does not decode): AUTOMATIC1111's clients (--api-auth) send
    the key so, under any user name."""
    scheme, _, encoded = value.strip(" \t").partition(" ")
    if not (scheme.isascii() and scheme.lower() == "basic"):
        return ""
    try:
        decoded = base64.b64decode(encoded.strip(" "), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[2]


def api_key_middleware(key: str) -> Middleware:
    """Every request but a CORS preflight, the documentation page's files (docs.py) and the
    web page (`/` for a browser, `/ui/`: page.py; a browser opens a page without headers)
    needs `Authorization: Bearer <key>`, or HTTP Basic with the key as its password (any user
    name: AUTOMATIC1111's clients); an event stream may instead carry a stream token
    (`?token=`, tokens.py) in its URL.

    The digests are compared, not the strings: constant time, and it does not leak the length.
    """
    expected = hashlib.sha256(key.encode()).digest()
    signing = token_key(key)

    @web.middleware
    async def require_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        name = request.match_info.route.name
        if (
            request.method != "OPTIONS"
            and name not in OPEN_ROUTES
            and not (name == INDEX_ROUTE and wants_page(request))
        ):
            header = request.headers.get("Authorization", "")
            token = bearer_token(header) or basic_password(header)
            given = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
            if not (hmac.compare_digest(given, expected) or _stream_token(request, signing)):
                error = ApiError(
                    401,
                    "unauthorized",
                    "send the API key as 'Authorization: Bearer <key>' (or as the password of "
                    "HTTP Basic auth)",
                    headers={"WWW-Authenticate": 'Bearer realm="sd-rest"'},
                )
                return error_response(error)
        return await handler(request)

    return require_api_key


def _stream_token(request: web.Request, signing: bytes) -> bool:
    if request.method != "GET" or request.match_info.route.name not in STREAM_ROUTES:
        return False
    return token_valid(signing, request.query.get("token"), time.time())


def connection_args(limits: Limits) -> dict[str, Any]:
    """How each connection's protocol parses and times requests."""
    return {
        # aiohttp has no header-read timeout; its keep-alive timer is armed from the moment a
        # connection is made (and again after each response) and closes a connection that
        # has not delivered complete headers when it fires, so it serves as one.
        "keepalive_timeout": limits.header_timeout,
        "max_line_size": MAX_LINE_BYTES,
        "max_field_size": MAX_LINE_BYTES,
        "max_headers": MAX_HEADERS,
        # Compressed bodies are refused (415): never spend time inflating one.
        "auto_decompress": False,
        "access_log": None,
    }


def create_app(manager: JobManager, http_host: str | None = None) -> web.Application:
    """`http_host`: where the same app is also served over plain HTTP (--http-host), which
    answers without CORS, and only to loopback names when it is a loopback address."""
    middlewares: list[Middleware] = [json_errors]
    if http_host is not None and loopback_address(http_host):
        middlewares.append(loopback_hosts_only)
    if manager.settings.api_key:
        # Only then: the status GET's hot path carries no key check when there is no key.
        middlewares.append(api_key_middleware(manager.settings.api_key))
    app = web.Application(
        middlewares=middlewares,
        client_max_size=MAX_BODY_BYTES,
        handler_args=connection_args(manager.settings.limits),
    )
    app[MANAGER] = manager
    app[OUTPUT_ROOT] = manager.store.output.resolve()
    app[TOKEN_KEY] = token_key(manager.settings.api_key)
    app[CURSOR_KEY] = load_cursor_key(manager.store.layout)
    hub = EventHub(manager, manager.settings.limits.stream_buffer)
    app[HUB] = hub
    app[STREAM_PING] = manager.settings.limits.stream_ping
    # Before aiohttp waits for handlers to end: streams end cleanly, after the last events
    # (server.py stops the manager first, so jobs put back in the queue are announced).
    app.on_shutdown.append(hub.close)
    app.on_response_prepare.append(
        add_common_headers if http_host is None else add_headers_by_transport
    )
    add_routes(app)
    add_dialect_routes(app)  # AUTOMATIC1111's /sdapi/v1 (api/a1111/)
    return app


class ApiProtocol(web.RequestHandler):
    """aiohttp's connection handler, answering requests its parser refuses in our JSON shape."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # As aiohttp does: a response has begun, so the connection can only be dropped.
            raise ConnectionError("the response had started; dropping the connection")
        if status >= 500 and status != 504:
            response = internal_error(request, exc)
        else:
            # Garbage from the network is routine (scanners, plain HTTP on the TLS port).
            log.debug("refused a malformed request from %s: %s", request.remote, message)
            response = error_response(
                ApiError(
                    status,
                    HTTP_CODES.get(status, "bad_request"),
                    _parser_message(status, message),
                    # Outside the app: its on_response_prepare does not run here.
                    headers=headers_for(request),
                )
            )
        response.force_close()
        return response


def _parser_message(status: int, message: str | None) -> str:
    if status == 504:
        return "the request took too long to handle"
    first = first_line(message or "")
    return f"malformed HTTP request: {first}" if first else "malformed HTTP request"


def make_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """The runner to serve `app` with (server.py): no access log, signals left to the caller."""
    return web.AppRunner(app, access_log=None, handle_signals=False, **kwargs)


def protocol_factory(runner: web.AppRunner, limits: Limits) -> Callable[[], ApiProtocol]:
    """Our protocol for each connection of the runner's server (after runner.setup())."""
    server = runner.server
    if server is None:
        raise RuntimeError("the runner is not set up")
    loop = asyncio.get_running_loop()
    args = connection_args(limits)
    return lambda: ApiProtocol(server, loop=loop, **args)


def ssl_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
