"""Serving the app over HTTPS until a signal, then stopping cleanly."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl
from collections.abc import Callable

from sd_rest.api.app import create_app, make_runner, protocol_factory
from sd_rest.api.listener import Listener, Slots
from sd_rest.jobs.manager import JobManager
from sd_rest.setup.access import output_problem

log = logging.getLogger(__name__)

# Seconds requests still being handled get to finish once the server stops: a client slowly
# uploading a body must not hold the exit up.
REQUEST_GRACE = 2.0


class StartFailed(Exception):
    """The server could not start, in one line: the jobs on disk could not be read or put
    right, or it could not listen."""


async def serve(
    manager: JobManager,
    host: str,
    port: int,
    context: ssl.SSLContext,
    on_ready: Callable[[str], None] | None = None,
    http: tuple[str, int] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, then stop taking jobs, end running scripts, exit. `http`:
    (host, port) where the same app is also served over plain HTTP (--http-port)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        unfinished = manager.recover()
    except OSError as exc:
        # A folder of the output made by another user, most often: say which, no traceback.
        raise StartFailed(
            output_problem(manager.settings.output, "recover the unfinished jobs", exc)
        ) from exc
    app = create_app(manager, http_host=None if http is None else http[0])
    runner = make_runner(app, shutdown_timeout=REQUEST_GRACE)
    await runner.setup()
    # Recovered jobs are queued before the first request can add one: submission order holds.
    await manager.start(unfinished)
    factory = protocol_factory(runner, manager.settings.limits)
    # One --max-connections for the server: both listeners take from the same slots.
    slots = Slots(manager.settings.max_connections)
    listeners = [Listener(factory, context, host, port, slots=slots)]
    if http is not None:
        listeners.append(Listener(factory, None, *http, slots=slots))
    # What start-up made (modules, the app, the OpenAPI document, recovered jobs) lives as long
    # as the server: out of the collector's sight, a full collection no longer walks it while a
    # request waits (bench `post`: p99).
    gc.collect()
    gc.freeze()
    try:
        for listener in listeners:
            await _listen(listener, listener.host, listener.port)
        if on_ready is not None:
            schemes = ("https", "http")[: len(listeners)]
            for scheme, listener in zip(schemes, listeners, strict=True):
                on_ready(url(scheme, listener))
        await stop.wait()
        log.info("stopping: no new jobs; ending running scripts")
        manager.stop_taking()
    finally:
        for listener in listeners:  # also those started before another failed to
            await listener.stop()
        # Also when listening failed: scripts already started for recovered jobs must end.
        await manager.shutdown()
        await runner.cleanup()
    log.info("stopped")


def url(scheme: str, listener: Listener) -> str:
    """The URL a listener serves, as a client would type it: an IPv6 address in brackets,
    the port it got (for a port of 0)."""
    host = listener.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    ports = [port for _, port in listener.addresses]
    return f"{scheme}://{host}:{ports[0] if ports else listener.port}"


async def _listen(listener: Listener, host: str, port: int) -> None:
    # Only here does an OSError mean the address: one elsewhere in start-up is not reported as
    # "cannot listen".
    try:
        await listener.start()
    except OSError as exc:
        raise StartFailed(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
