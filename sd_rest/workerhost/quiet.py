"""One line per outage, not one a second: while Redis is away, Dramatiq's consumer threads
(one per queue, and one per delay queue) each log a connection error and a restart every 3 s,
and the cancel listener would retry every second. An hour's outage must not be 10,000 lines of
log: a line said again within `QUIET_FOR` seconds is dropped."""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Final

QUIET_FOR: Final = 60.0  # seconds a repeated line stays unsaid
# The lines that repeat while Redis is away; their text varies only in the queue's name.
REPEATING: Final = re.compile(
    r"^(Consumer encountered a connection error|Restarting consumer in|"
    r"Failed to post_process_message|listening for cancels)"
)


class OncePerOutage(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._said: dict[str, float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        match = REPEATING.match(str(record.msg))
        if match is None:
            return True
        now = time.monotonic()
        with self._lock:
            last = self._said.get(match.group(1))
            if last is not None and now - last < QUIET_FOR:
                return False
            self._said[match.group(1)] = now
        return True


def install() -> None:
    """On every handler of the root logger (a logger's own filter misses its children)."""
    quiet = OncePerOutage()
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet)
