"""Serving the app over HTTPS until a signal, then stopping cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Callable

from aiohttp import web

from .app import create_app
from .manager import JobManager

log = logging.getLogger(__name__)


async def serve(
    manager: JobManager,
    host: str,
    port: int,
    context: ssl.SSLContext,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, then stop taking jobs, end running scripts, exit."""
    unfinished = manager.recover()
    app = create_app(manager)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=context, backlog=1024)
    await site.start()
    await manager.start(unfinished)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(f"https://{host}:{port}")
    await stop.wait()
    log.info("stopping: no new jobs; ending running scripts")
    await site.stop()
    await manager.shutdown()
    await runner.cleanup()
