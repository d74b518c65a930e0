"""--max-connections: beyond it a new connection is closed at once, before any TLS work, and
the clients already connected are served as before."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
import time

import pytest

from sd_rest.api.listener import RECLAIM_EVERY, Listener

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


def test_memory_is_reclaimed_after_connections_close_not_only_after_they_come(
    certs: tuple[str, str, str],
) -> None:
    """The listener's full collection (what frees the cycles closed TLS connections leave)
    runs after the last connection has gone, even when no connection came since the
    collection before: the closes alone must bring it."""
    cert, key, ca = certs
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=ca)
    full_collections: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            full_collections.append(time.monotonic())

    async def scenario() -> None:
        listener = Listener(asyncio.Protocol, server_context, "127.0.0.1", 0)
        await listener.start()
        ((_, port),) = listener.addresses
        try:
            clients = [
                await asyncio.open_connection("127.0.0.1", port, ssl=client_context,
                                              server_hostname="localhost")
                for _ in range(5)
            ]  # fmt: skip
            # A reclaim sees the accepts while the connections are still open.
            collections_before = len(full_collections)
            while len(full_collections) == collections_before:
                await asyncio.sleep(0.05)
            for _, writer in clients:
                writer.close()
            while listener.open:
                await asyncio.sleep(0.01)
            gone = time.monotonic()
            deadline = gone + 3 * RECLAIM_EVERY
            while not any(t > gone for t in full_collections) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert any(t > gone for t in full_collections), "no collection after the closes"
        finally:
            await listener.stop()

    gc.disable()  # only the listener's own collections are counted
    gc.callbacks.append(on_gc)
    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        gc.callbacks.remove(on_gc)
        gc.enable()
