"""--http-port and --http-host: the same app over plain HTTP (127.0.0.1 by default); with
--api-key, HTTP Basic whose password is the key is accepted everywhere beside Bearer, and
without a key an Authorization header is ignored."""

from __future__ import annotations

import base64

import pytest

from helpers import Server, free_port, http_request, start_with_http, wait_until

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
