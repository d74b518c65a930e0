"""Every server setting in one place: resolved once (by the CLI) and passed down explicitly."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Final

DEFAULT_MIN_FREE: Final = 1024**3  # bytes kept free on the output disk beyond a job's needs
DEFAULT_MAX_CONNECTIONS: Final = 512  # connections open at once (api/listener.py)


HEADER_TIMEOUT_ENV: Final = "SD_REST_HEADER_TIMEOUT"
BODY_TIMEOUT_ENV: Final = "SD_REST_BODY_TIMEOUT"
STREAM_PING_ENV: Final = "SD_REST_STREAM_PING"
STREAM_BUFFER_ENV: Final = "SD_REST_STREAM_BUFFER"
MAX_TIMEOUT: Final = 3600.0


def loopback_address(host: str) -> bool:
    """Whether a listening address (--http-host) is the loopback only: localhost, 127.0.0.0/8
    or ::1 (bracketed or not)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Model(str, Enum):
    """The two checkpoints a server is given; each endpoint runs on one of them."""

    TEXT_TO_IMAGE = "text-to-image"
    INPAINT_IMAGE = "inpaint-image"

    @property
    def flag(self) -> str:
        return f"--{self.value}-model"


@dataclass(frozen=True)
class Limits:
    """Time limits on slow clients (seconds)."""

    # From connecting (or from the previous response) to the end of a request's headers; also
    # how long an idle keep-alive connection stays open. aiohttp has one timer for both.
    header_timeout: float = 30.0
    body_timeout: float = 120.0  # to receive a whole POST body
    stream_ping: float = 15.0  # between two comments on an idle event stream (keeps proxies)
    stream_buffer: int = 256 * 1024  # bytes of events waiting for one stream client, at most


def limits_from_environment(environ: Mapping[str, str]) -> Limits:
    """The time limits, each overridable by an environment variable (seconds); ValueError
    with one line naming the variable for a bad value."""
    default = Limits()
    return Limits(
        header_timeout=_seconds(environ, HEADER_TIMEOUT_ENV, default.header_timeout),
        body_timeout=_seconds(environ, BODY_TIMEOUT_ENV, default.body_timeout),
        stream_ping=_seconds(environ, STREAM_PING_ENV, default.stream_ping),
        stream_buffer=_bytes(environ, STREAM_BUFFER_ENV, default.stream_buffer),
    )


def _bytes(environ: Mapping[str, str], name: str, default: int) -> int:
    text = environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or not 1024 <= int(text) <= 2**30:
        raise ValueError(f"{name} must be a number of bytes from 1024 to {2**30}, got {text!r}")
    return int(text)


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise ValueError(f"{name} must be between 0 and {MAX_TIMEOUT:g} seconds, got {text!r}")
    return value


@dataclass(frozen=True)
class Settings:
    repository: Path  # the Stable Diffusion checkout whose scripts we run
    python: Path  # interpreter that runs those scripts
    text_to_image_model: Path
    inpaint_image_model: Path
    output: Path
    concurrency: int = 1
    max_queue: int = 1000  # waiting jobs; a POST beyond it gets 429
    api_key: str | None = None
    shutdown_grace: float = 3.0  # seconds between interrupting and killing scripts on stop
    min_free_space: int = DEFAULT_MIN_FREE  # bytes kept free on the output disk; see disk.py
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open at once; more are closed at once
    limits: Limits = field(default_factory=Limits)
    finished_cache: int = 1024  # finished jobs kept in memory once read (the rest on disk)
    runner: str = "resident"  # or "process": one fresh process per job (runners.py)
    worker_max_jobs: int = 100  # a resident worker is replaced after this many jobs
    worker_idle_seconds: float = 600.0  # and after being idle this long (memory back to the OS)
    # A worker silent this long (no heartbeat: hung, or stopped) is killed, its job resumed.
    worker_timeout: float = 120.0
    warm_start: bool = True  # a worker loads the text-to-image model before the first job
    # Redis URL of the cluster (--broker): jobs run on worker hosts, none here.
    broker: str | None = None
    heartbeat_timeout: float = 30.0  # a worker host silent this long is dead (--broker)

    def checkpoint(self, model: Model) -> Path:
        if model is Model.TEXT_TO_IMAGE:
            return self.text_to_image_model
        return self.inpaint_image_model
