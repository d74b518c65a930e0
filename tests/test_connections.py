"""--max-connections: beyond it a new connection is closed at once, before any TLS work, and
the clients already connected are served as before."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

import pytest

from helpers import Server, read_response, tls_socket


def get_on(sock: ssl.SSLSocket) -> int:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head = read_response(sock)
    return int(head.split(b" ", 2)[1])


def refused_quickly(server: Server) -> float:
    """Seconds until a new TLS connection fails; fails the test if it is served."""
    start = time.monotonic()
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)), tls_socket(server, 10) as sock:
        get_on(sock)
    return time.monotonic() - start


def test_connections_beyond_the_limit_are_closed_and_the_others_served(make_server) -> None:
    server: Server = make_server(args=["--max-connections", "20"])
    time.sleep(0.5)  # the start-up check's own connection is let go
    held = [tls_socket(server) for _ in range(20)]
    try:
        assert refused_quickly(server) < 2.0
        # Plain TCP beyond the limit too: closed without waiting for a handshake.
        # Reset, even before connect returns.
        with (
            contextlib.suppress(ConnectionResetError),
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        ):
            raw.settimeout(5)
            assert raw.recv(1) == b""
        assert [get_on(sock) for sock in held] == [200] * 20  # keep-alive, still served
        for sock in held[:5]:
            sock.close()
        deadline = time.monotonic() + 10
        while True:  # the server notices the closes within moments
            try:
                with tls_socket(server) as sock:
                    assert get_on(sock) == 200
                break
            except (ssl.SSLError, ConnectionError, OSError):
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        for sock in held:
            sock.close()


def test_the_limit_counts_connections_still_in_their_handshake(make_server) -> None:
    server: Server = make_server(args=["--max-connections", "5"])
    time.sleep(0.5)  # the start-up check's own connection is let go
    # Five clients connect and say nothing: they hold their places until they go.
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
    try:
        time.sleep(0.3)
        assert refused_quickly(server) < 2.0
    finally:
        for sock in silent:
            sock.close()
    time.sleep(0.3)
    with tls_socket(server) as sock:
        assert get_on(sock) == 200
