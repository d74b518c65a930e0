"""Watch a run's output folder and say when files change there."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

log = logging.getLogger(__name__)

# watchfiles batches changes until `STEP_MS` pass without a new one: small, so that a finished
# PNG is noticed within milliseconds; the Rust side sleeps between polls of inotify/FSEvents.
STEP_MS = 5
DEBOUNCE_MS = 50


async def watch_folder(
    folder: Path, on_change: Callable[[], Awaitable[None]], stop: asyncio.Event
) -> None:
    """Call `on_change` after every batch of changes below `folder` until `stop` is set."""
    try:
        async for _changes in watchfiles.awatch(
            folder,
            watch_filter=None,
            step=STEP_MS,
            debounce=DEBOUNCE_MS,
            stop_event=stop,
            rust_timeout=100,
            yield_on_timeout=False,
        ):
            await on_change()
    except FileNotFoundError as exc:
        # The folder can vanish when a run is cancelled; the publisher's final look still runs.
        log.debug("watching %s ended: %s", folder, exc)
    except RuntimeError as exc:
        # Images are still found when the outer bar moves on and when the run ends, only later.
        log.warning("watching %s for images failed: %s", folder, exc)
