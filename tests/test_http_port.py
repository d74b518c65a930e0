"""--http-port and --http-host: the same app over plain HTTP (127.0.0.1 by default); with
--api-key, HTTP Basic whose password is the key is accepted everywhere beside Bearer, and
without a key an Authorization header is ignored."""

from __future__ import annotations

import base64
import http.client
import re
import socket
import time

import pytest

from sd_rest.settings import loopback_address

from helpers import Server, free_port, http_request, read_response, start_with_http, wait_until

KEY = "http-k3y"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_plain_http_serves_the_same_app_on_the_loopback(make_server) -> None:
    server = start_with_http(make_server)
    port = server.http_port
    assert http_request(port, "GET", "/").json()["name"] == "sd-rest"
    assert http_request(port, "GET", "/sdapi/v1/options").status == 200
    resp = http_request(port, "POST", "/text-to-image", {"prompt": "over http", "steps": 2})
    assert resp.status == 303 and server.get(resp.headers["Location"]).status == 200
    assert f"serving http://127.0.0.1:{port}" in server.log()
    # Without a key, any Authorization header is ignored (SillyTavern sends "Basic ").
    for header in ("Basic ", "Bearer nothing", "Basic Og=="):
        assert (
            http_request(
                port, "GET", "/sdapi/v1/sd-models", headers={"Authorization": header}
            ).status
            == 200
        )
    assert "without an API key" not in server.log().split("serving https")[1]


def keyed(make_server, port: int, *args: str) -> Server:
    """A server with the key, once it answers (its GET / is a 401)."""
    server = make_server(args=["--http-port", str(port), *args, "--api-key", KEY], start=False)
    server.start(wait=False)
    wait_until(lambda: _answers(port), "the keyed server to answer")
    return server


def _answers(port: int) -> bool:
    try:
        return http_request(port, "GET", "/").status == 401
    except OSError:
        return False


def test_with_a_key_basic_or_bearer_opens_every_route(make_server) -> None:
    port = free_port()
    server = keyed(make_server, port)
    for path in ("/sdapi/v1/options", "/jobs", "/"):
        assert http_request(port, "GET", path).status == 401
        assert http_request(port, "GET", path, headers=basic("anyone", KEY)).status == 200
        assert http_request(port, "GET", path, headers=basic("", KEY)).status == 200
        assert (
            http_request(port, "GET", path, headers={"Authorization": f"Bearer {KEY}"}).status
            == 200
        )
        assert http_request(port, "GET", path, headers=basic(KEY, "wrong")).status == 401
        assert http_request(port, "GET", path, headers={"Authorization": "Basic !!"}).status == 401
    # Over HTTPS too.
    assert server.get("/sdapi/v1/progress", headers=basic("u", KEY)).status == 200
    assert server.get("/sdapi/v1/progress").status == 401


@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False)])
def test_another_interface_warns_without_a_key(make_server, host: str, warned: bool) -> None:
    port = free_port()
    server = make_server(args=["--http-port", str(port), "--http-host", host])
    assert http_request(port, "GET", "/internal/ping").status == 200
    assert ("serving plain HTTP on 0.0.0.0 without an API key" in server.log()) is warned
    server.end()
    with_key = keyed(make_server, free_port(), "--http-host", host)
    assert "plain HTTP" not in with_key.log()


def test_http_host_without_http_port_is_refused(make_server) -> None:
    server = make_server(args=["--http-host", "0.0.0.0"], start=False)
    server.start(wait=False)
    assert server.process is not None and server.process.wait(20) != 0
    assert "--http-host needs --http-port" in server.log()


CORS = "Access-Control-Allow-Origin"


def test_plain_http_sends_no_cors_headers_https_does(make_server) -> None:
    """As AUTOMATIC1111 without --cors-allow-origins: its clients call it from their servers,
    and no web page a browser has open may read its answers."""
    server = start_with_http(make_server)
    port = server.http_port
    answers = [
        http_request(port, "GET", "/sdapi/v1/options"),
        http_request(port, "GET", "/nowhere"),
        http_request(port, "POST", "/sdapi/v1/txt2img", {"prompt": "x", "steps": 0}),
        http_request(port, "OPTIONS", "/sdapi/v1/txt2img", headers={"Origin": "http://a.test"}),
        http_request(port, "GET", "/"),
    ]
    assert [resp.status for resp in answers] == [200, 404, 422, 204, 200]
    for resp in answers:
        assert not any(name.lower().startswith("access-control") for name in resp.headers)
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    # The parser's own refusals too (a header line too long).
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nX: " + b"a" * 9000 + b"\r\n\r\n")
        head = read_response(sock)
    assert b" 431 " in head.split(b"\r\n")[0] or b" 400 " in head.split(b"\r\n")[0]
    assert b"access-control" not in head.lower() and b"nosniff" in head
    # HTTPS keeps its CORS.
    assert server.get("/sdapi/v1/options").headers[CORS] == "*"
    assert server.get("/nowhere").headers[CORS] == "*"


LOOPBACK_HOSTS = [
    "localhost", "localhost:{port}", "127.0.0.1:{port}", "127.9.9.9", "[::1]:{port}",
    "app.localhost:{port}", "LOCALHOST.",
]  # fmt: skip
OTHER_HOSTS = [
    "evil.example", "evil.example:{port}", "localhost.evil.example", "127.0.0.1.evil.example",
    "192.168.1.20:{port}", "[::2]:{port}", "localhost:{port}x", "[::1", "::1", "0.0.0.0",
]  # fmt: skip


def test_loopback_plain_http_refuses_host_names_other_than_the_loopbacks(make_server) -> None:
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 sends its
    own name as Host; refused before any route (and before the key's check)."""
    server = start_with_http(make_server)
    port = server.http_port
    for host in LOOPBACK_HOSTS:
        name = host.format(port=port)
        resp = http_request(port, "GET", "/sdapi/v1/options", headers={"Host": name})
        assert resp.status == 200, (name, resp.status)
    for host in OTHER_HOSTS:
        name = host.format(port=port)
        for path in ("/sdapi/v1/options", "/sdapi/v1/txt2img", "/", "/nowhere"):
            resp = http_request(port, "GET", path, headers={"Host": name})
            assert resp.status == 400, (name, path, resp.status)
            error = resp.json()["error"]
            assert error["code"] == "bad_request" and "DNS rebinding" in error["message"]
        # HTTPS answers whatever the Host (its certificate names the server).
        assert server.get("/sdapi/v1/options", headers={"Host": name}).status == 200


def test_plain_http_on_another_interface_takes_any_host(make_server) -> None:
    port = free_port()
    make_server(args=["--http-port", str(port), "--http-host", "0.0.0.0"])
    for name in ("evil.example", "192.168.1.20:7860"):
        resp = http_request(port, "GET", "/sdapi/v1/options", headers={"Host": name})
        assert resp.status == 200


def test_the_serving_line_shows_the_port_chosen_and_brackets_ipv6(make_server) -> None:
    server = make_server(args=["--http-port", "0", "--http-host", "::1"])
    match = re.search(r"serving http://\[::1\]:([0-9]+) ", server.log())
    assert match is not None, server.log()
    port = int(match.group(1))
    assert port != 0
    conn = http.client.HTTPConnection("::1", port, timeout=30)
    try:
        conn.request("GET", "/internal/ping")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_one_connection_limit_for_both_listeners(make_server) -> None:
    """--max-connections bounds the server: connections held on the HTTPS port leave none
    for plain HTTP."""
    server = start_with_http(make_server, args=["--max-connections", "4"])
    time.sleep(0.5)  # the start-up check's own connection is let go
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
    try:
        time.sleep(0.3)
        with pytest.raises((OSError, http.client.HTTPException)):
            http_request(server.http_port, "GET", "/internal/ping", timeout=10)
    finally:
        for sock in silent:
            sock.close()
    wait_until(lambda: _pings(server.http_port), "plain HTTP to answer again")


def _pings(port: int) -> bool:
    try:
        return http_request(port, "GET", "/internal/ping", timeout=10).status == 200
    except (OSError, http.client.HTTPException):
        return False


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("192.168.1.10", False), ("::", False),
     ("example.com", False)],
)  # fmt: skip
def test_which_http_hosts_are_the_loopback(host: str, loopback: bool) -> None:
    # One answer for the start-up's warning (cli.py) and the Host check (api/app.py).
    assert loopback_address(host) is loopback
