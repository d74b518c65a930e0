"""The optional API key: every route needs it (unknown paths too), a CORS preflight does not;
a server open to every interface without one says so when it starts."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from helpers import Server, mask_bytes, multipart, png_bytes, raw_request

KEY = "s3cret-K3y_with.punctuation~"
UNKNOWN_ID = "f" * 32


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, certs) -> Iterator[Server]:
    output = tmp_path_factory.mktemp("keyed") / "output"
    server = Server(output=output, certs=certs, args=["--api-key", KEY])
    # wait_ready polls GET / without the key: it must see 401, so start without waiting.
    server.start(wait=False)
    try:
        wait_for_401(server)
        yield server
    finally:
        server.end()


def wait_for_401(server: Server) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if server.get("/").status == 401:
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(server.log())


def auth(value: str) -> dict[str, str]:
    return {"Authorization": value}


def requests_of_every_route(server: Server, headers: dict[str, str]) -> list[tuple[str, int]]:
    """(what, status) for one request to every route, and to an unknown path."""
    body, ctype = multipart({"prompt": "a", "steps": "2"})
    image_body, image_ctype = multipart(
        {"steps": "2"}, {"image": png_bytes(256, 256), "mask": mask_bytes(256, 256)}
    )
    calls = [
        ("GET /", "GET", "/", None, {}),
        ("POST text-to-image", "POST", "/text-to-image", body, {"Content-Type": ctype}),
        ("POST inpaint-image", "POST", "/inpaint-image", image_body, {"Content-Type": image_ctype}),
        ("GET status", "GET", f"/text-to-image/{UNKNOWN_ID}", None, {}),
        ("DELETE", "DELETE", f"/text-to-image/{UNKNOWN_ID}", None, {}),
        ("GET image", "GET", f"/text-to-image/{UNKNOWN_ID}/1.png", None, {}),
        ("HEAD image", "HEAD", f"/text-to-image/{UNKNOWN_ID}/1.png", None, {}),
        ("unknown path", "GET", "/nope", None, {}),
        ("wrong method", "PUT", "/text-to-image", b"", {}),
    ]
    results = []
    for what, method, path, data, extra in calls:
        resp = server.request(method, path, data, {**extra, **headers})
        results.append((what, resp.status))
        if resp.status == 401 and method != "HEAD":
            assert resp.json()["error"]["code"] == "unauthorized"
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
    return results


@pytest.mark.parametrize(
    "headers",
    [
        {},
        auth(""),
        auth("Bearer"),
        auth("Bearer "),
        auth(f"Basic {KEY}"),
        auth(KEY),
        auth(f"Bearer {KEY[:-1]}"),
        auth(f"Bearer {KEY}x"),
        auth(f"Bearer {KEY.upper()}"),
        auth(f"Bearer{KEY}"),
    ],
    ids=lambda h: repr(h.get("Authorization")),
)
def test_every_route_needs_the_key(keyed: Server, headers: dict[str, str]) -> None:
    results = requests_of_every_route(keyed, headers)
    assert all(status == 401 for _, status in results), results


def test_with_the_key_every_route_answers(keyed: Server) -> None:
    results = dict(requests_of_every_route(keyed, auth(f"Bearer {KEY}")))
    assert results == {
        "GET /": 200,
        "POST text-to-image": 303,
        "POST inpaint-image": 303,
        "GET status": 404,
        "DELETE": 404,
        "GET image": 404,
        "HEAD image": 404,
        "unknown path": 404,
        "wrong method": 405,
    }
    # The scheme is case-insensitive (RFC 7235).
    assert keyed.get("/", auth(f"bearer {KEY}")).status == 200


def test_a_finished_image_needs_the_key(keyed: Server) -> None:
    good = auth(f"Bearer {KEY}")
    body, ctype = multipart({"prompt": "keyed image", "steps": "2"})
    location = keyed.request("POST", "/text-to-image", body, {"Content-Type": ctype, **good})
    url = location.headers["Location"]
    deadline = time.monotonic() + 20
    while keyed.get(url, good).json()["status"] != "COMPLETE":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert keyed.get(f"{url}/1.png", good).status == 200
    assert keyed.get(f"{url}/1.png").status == 401
    assert keyed.get(url).status == 401


def test_preflight_stays_open(keyed: Server) -> None:
    for path in ("/text-to-image", f"/text-to-image/{UNKNOWN_ID}", "/"):
        resp = keyed.request("OPTIONS", path)
        assert resp.status == 204, path
        assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]


def test_a_header_that_is_not_utf8_is_a_401_not_a_crash(keyed: Server) -> None:
    resp = raw_request(
        keyed,
        b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert resp.status == 401
    assert keyed.get("/", auth(f"Bearer {KEY}")).status == 200


def with_authorization(server: Server, value: bytes) -> int:
    """The status of `GET /` with this Authorization header, sent as these bytes (UTF-8 for
    anything beyond ASCII, as a browser's fetch sends it)."""
    request = b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\nConnection: close\r\n\r\n"
    return raw_request(server, request % value).status


# Unicode whitespace that str.strip() and str.split() take, but HTTP does not: none of it may
# stand around or inside the key.
UNICODE_SPACES = ["\u00a0", "\u0085", "\u1680", "\u2003", "\u2028", "\u3000"]


@pytest.mark.parametrize("space", UNICODE_SPACES, ids=ascii)
def test_the_key_is_compared_exactly(keyed: Server, space: str) -> None:
    for value in (
        f"Bearer {KEY}{space}",
        f"Bearer {space}{KEY}",
        f"Bearer{space}{KEY}",
        f"{space}Bearer {KEY}",
        f"Bearer {KEY[:5]}{space}{KEY[5:]}",
    ):
        assert with_authorization(keyed, value.encode()) == 401, ascii(value)


def test_the_forms_http_allows_still_work(keyed: Server) -> None:
    """The scheme in any case; one or more spaces before the key (RFC 6750: `1*SP`); spaces or
    tabs around the whole value are HTTP's optional whitespace, never part of it."""
    for value in (
        f"Bearer {KEY}",
        f"bearer {KEY}",
        f"BEARER {KEY}",
        f"Bearer   {KEY}",
        f"Bearer {KEY} ",
        f"Bearer {KEY}\t",
        f"  Bearer {KEY}",
    ):
        assert with_authorization(keyed, value.encode()) == 200, ascii(value)
    for value in (f"Bearer\t{KEY}", f"Bearer {KEY} x", f"Bearer {KEY} {KEY}"):
        assert with_authorization(keyed, value.encode()) == 401, ascii(value)


def test_bearer_token_takes_only_http_whitespace() -> None:
    from sd_rest.api.app import bearer_token

    assert bearer_token("Bearer k") == "k"
    assert bearer_token(" \tbEaReR   k\t ") == "k"
    assert bearer_token("Bearer k\u00a0") == "k\u00a0"
    assert bearer_token("Bearer \u2003k") == "\u2003k"
    for other in ("", "Bearer", "Bearer ", "Basic k", "k", "Bearer\tk", "Bearer\u00a0k", "Bearerk"):
        assert bearer_token(other) == "", other


def test_the_key_from_the_environment(make_server) -> None:
    server: Server = make_server(env={"SD_REST_API_KEY": "from-env"}, start=False)
    server.start(wait=False)
    wait_for_401(server)
    assert server.get("/", auth("Bearer from-env")).status == 200


def all_interfaces_warning(log: str) -> list[str]:
    return [line for line in log.splitlines() if "all interfaces without an API key" in line]


def test_all_interfaces_without_a_key_warn_once(make_server) -> None:
    server: Server = make_server(args=["--host", "0.0.0.0"])
    (line,) = all_interfaces_warning(server.log())
    assert "WARNING" in line and "--api-key" in line


def test_no_warning_with_a_key_or_on_loopback(make_server, tmp_path) -> None:
    keyed_server: Server = make_server(args=["--host", "0.0.0.0", "--api-key", KEY], start=False)
    keyed_server.start(wait=False)
    wait_for_401(keyed_server)
    assert all_interfaces_warning(keyed_server.log()) == []
    loopback: Server = make_server(output=tmp_path / "loopback")
    assert all_interfaces_warning(loopback.log()) == []


@pytest.mark.parametrize("key", ["", "has space", "tab\there", "ünïcode"])
def test_a_key_no_client_could_send_is_refused_at_start(tmp_path, key: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sd_rest", "--demo", "--output", str(tmp_path), "--api-key", key],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("stable-diffusion-rest-api: error: the API key")
