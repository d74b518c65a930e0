"""Slow clients are cut off: headers must be complete within SD_REST_HEADER_TIMEOUT of
connecting (or of the previous response), a POST body within SD_REST_BODY_TIMEOUT."""

from __future__ import annotations

import json
import select
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sd_rest.settings import Limits, limits_from_environment

from helpers import Server, parse_response, read_response, tls_socket, wait_until

GIVE_UP = 20.0  # seconds after which a connection the server never cut off fails the test


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory, certs) -> Iterator[Server]:
    output = tmp_path_factory.mktemp("strict") / "output"
    env = {"SD_REST_HEADER_TIMEOUT": "1", "SD_REST_BODY_TIMEOUT": "1"}
    server = Server(output=output, certs=certs, env=env, debug_log=True).start()
    yield server
    server.end()


def trickle(sock: ssl.SSLSocket, data: bytes, pause: float) -> tuple[bool, bytes]:
    """Send `data` a byte at a time until the server answers or closes the connection.

    Returns (whether every byte was sent, the server's response if it sent one).
    """
    deadline = time.monotonic() + GIVE_UP
    for byte in data:
        if time.monotonic() > deadline:
            break
        received = poll(sock)
        if received is not None:
            return False, read_response(sock, received) if received else b""
        try:
            sock.sendall(bytes([byte]))
        except (OSError, ssl.SSLError):
            return False, read_response(sock)
        time.sleep(pause)
    return True, b""


def poll(sock: ssl.SSLSocket) -> bytes | None:
    """What the server sent so far without waiting: None for nothing, b"" for a close.

    A readable socket may only hold TLS records without data (session tickets), hence the
    non-blocking read rather than select alone.
    """
    if not select.select([sock], [], [], 0)[0] and not sock.pending():
        return None
    sock.setblocking(False)
    try:
        return sock.recv(65536)
    except (ssl.SSLWantReadError, BlockingIOError):
        return None
    except (OSError, ssl.SSLError):
        return b""
    finally:
        sock.settimeout(GIVE_UP)


def closed_by_server(sock: ssl.SSLSocket) -> bool:
    try:
        return sock.recv(65536) == b""
    except (OSError, ssl.SSLError):
        return True


def test_headers_sent_too_slowly_are_cut_off(strict: Server) -> None:
    with tls_socket(strict, timeout=GIVE_UP) as sock:
        headers = b"GET / HTTP/1.1\r\nHost: localhost\r\n" + b"X-Slow: " + b"a" * 400
        finished, answer = trickle(sock, headers, 0.05)
        assert not finished, "the server waited for the headers for ever"
        assert answer == b""  # no answer: there was no request yet
        assert closed_by_server(sock)


def test_a_connection_that_sends_nothing_is_closed(strict: Server) -> None:
    with tls_socket(strict, timeout=GIVE_UP) as sock:
        assert closed_by_server(sock)


def test_a_stalled_body_gets_a_408(strict: Server) -> None:
    with tls_socket(strict, timeout=GIVE_UP) as sock:
        sock.sendall(
            b"POST /text-to-image HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            b'{"prompt": "st'
        )
        response = parse_response(read_response(sock))
    assert response.status == 408
    assert response.json()["error"]["code"] == "timeout"


def test_a_trickled_body_gets_a_408(strict: Server) -> None:
    with tls_socket(strict, timeout=GIVE_UP) as sock:
        sock.sendall(
            b"POST /text-to-image HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000\r\n\r\n"
        )
        finished, answer = trickle(sock, b"--b\r\n" + b"x" * 995, 0.05)
    assert not finished
    response = parse_response(answer)
    assert response.status == 408
    assert response.json()["error"]["code"] == "timeout"


def test_keep_alive_within_the_limit_still_works(strict: Server) -> None:
    with tls_socket(strict) as sock:
        for _ in range(3):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert parse_response(read_response(sock)).status == 200
            time.sleep(0.3)
    assert strict.process is not None and strict.process.poll() is None
    assert strict.get("/").status == 200


def test_a_slow_body_within_its_limit_outlasts_the_header_timeout(make_server) -> None:
    """The header timer does not cut a request whose body is still arriving in time."""
    server: Server = make_server(
        env={"SD_REST_HEADER_TIMEOUT": "0.5", "SD_REST_BODY_TIMEOUT": "30"}
    )
    body = json.dumps({"prompt": "slow but steady", "steps": 2}).encode()
    with tls_socket(server, timeout=GIVE_UP) as sock:
        sock.sendall(
            b"POST /text-to-image HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        finished, answer = trickle(sock, body, 1.5 / len(body))
        assert finished, answer
        response = parse_response(read_response(sock))
    assert response.status == 303, response.body


def test_limits_from_the_environment() -> None:
    assert limits_from_environment({}) == Limits()
    assert limits_from_environment(
        {"SD_REST_HEADER_TIMEOUT": " 2.5 ", "SD_REST_BODY_TIMEOUT": "600"}
    ) == Limits(header_timeout=2.5, body_timeout=600.0)
    assert limits_from_environment({"SD_REST_BODY_TIMEOUT": ""}) == Limits()
    for bad in ("abc", "0", "-1", "nan", "inf", "3601"):
        with pytest.raises(ValueError, match="SD_REST_HEADER_TIMEOUT"):
            limits_from_environment({"SD_REST_HEADER_TIMEOUT": bad})


def test_a_bad_limit_stops_the_start_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sd_rest", "--demo", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"SD_REST_BODY_TIMEOUT": "soon", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert "SD_REST_BODY_TIMEOUT" in line and "soon" in line


def test_a_client_hanging_up_mid_body_is_not_an_error(strict: Server) -> None:
    logged = len(strict.log())
    for content_type in ("multipart/form-data; boundary=b", "application/json"):
        with tls_socket(strict) as sock:
            sock.sendall(
                b"POST /text-to-image HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
                b"Content-Type: %s\r\nContent-Length: 5000\r\n\r\n" % content_type.encode()
            )
            # The 100 says the request has reached its handler, which reads the body next: the
            # client goes while the server is reading, not before it has seen the request.
            interim = b""
            while b"\r\n\r\n" not in interim and (chunk := sock.recv(1024)):
                interim += chunk
            assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
            sock.sendall(b"--b\r\n")

    def handled() -> list[str]:
        # Each request the server gave up on is logged: at DEBUG when the client went away, as
        # an ERROR with its traceback when the server took the hang-up for a fault of its own.
        lines = strict.log()[logged:].splitlines()
        return [line for line in lines if "POST /text-to-image" in line]

    lines = wait_until(lambda: len(handled()) >= 2 and handled(), "the server to handle both")
    strict.assert_serving(since=logged)
    assert all("client closed the connection" in line for line in lines), lines
