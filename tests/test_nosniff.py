"""`X-Content-Type-Options: nosniff` on every response the server sends: JSON, images, the
page, event streams, every error (the app's, the router's, the key check's, and the HTTP
parser's, which are answered outside the app)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from helpers import Response, Server, multipart, raw_request
from sse import EventStream

UNKNOWN = "/text-to-image/" + "f" * 32


def nosniff(headers: Mapping[str, str]) -> bool:
    return {k.lower(): v for k, v in headers.items()}.get("x-content-type-options") == "nosniff"


def finished_job(server: Server) -> str:
    body, ctype = multipart({"prompt": f"nosniff {time.time_ns()}", "steps": "2"})
    url = server.request("POST", "/text-to-image", body, {"Content-Type": ctype}).headers[
        "Location"
    ]
    server.wait_status(url, {"COMPLETE"})
    return url


def test_every_response_says_nosniff(make_server: Callable[..., Server]) -> None:
    server = make_server(env={"SD_REST_BODY_TIMEOUT": "0.5"})
    url = finished_job(server)
    body, ctype = multipart({"prompt": "posted"})
    with EventStream(server, f"{url}/events") as ended:
        seen = ended.rest()[-1].id  # its final event: a reconnection after it gets a 204
    answers: dict[str, Response] = {
        "page": server.get("/", {"Accept": "text/html"}),
        "index": server.get("/"),
        "status": server.get(url),
        "image": server.get(f"{url}/1.png"),
        "listing": server.get("/jobs"),
        "openapi": server.get("/openapi.json"),
        "303": server.request("POST", "/text-to-image", body, {"Content-Type": ctype}),
        "400": server.request("POST", "/text-to-image", b"{}", {"Content-Type": "text/x"}),
        "404": server.get(UNKNOWN),
        "405": server.request("PUT", "/text-to-image", b""),
        "preflight": server.request("OPTIONS", "/text-to-image"),
        "token": server.request("POST", "/events/token", b""),
        "stream 204": server.get(f"{url}/events?lastEventId={seen}"),
        "parser 400": raw_request(server, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"),
        "408": raw_request(
            server,
            b"POST /text-to-image HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{",
        ),
    }
    with EventStream(server, "/events") as stream:
        streamed = stream.headers
    statuses = {name: answer.status for name, answer in answers.items()}
    assert statuses == {
        "page": 200,
        "index": 200,
        "status": 200,
        "image": 200,
        "listing": 200,
        "openapi": 200,
        "303": 303,
        "400": 415,
        "404": 404,
        "405": 405,
        "preflight": 204,
        "token": 200,
        "stream 204": 204,
        "parser 400": 400,
        "408": 408,
    }
    assert [name for name, answer in answers.items() if not nosniff(answer.headers)] == []
    assert nosniff(streamed)


def test_a_refused_key_says_nosniff(make_server: Callable[..., Server]) -> None:
    server = make_server(args=["--api-key", "nosniff-key"], start=False)
    server.start(wait=False)
    deadline = time.monotonic() + 20
    while True:
        try:
            refused = server.get("/jobs")
            break
        except OSError:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
    assert refused.status == 401 and nosniff(refused.headers)
    with EventStream(server, "/events") as stream:
        assert stream.status == 401 and nosniff(stream.headers)
