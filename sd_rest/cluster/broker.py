"""The broker's settings, shared by the API node and the worker hosts: the Redis URL, the
Dramatiq broker made with the options a job of several minutes needs, and Redis's failures in
one line that says what to fix.

Dramatiq's defaults would not do: its time limit (10 min) kills a long job and retries it, and
a dead host's messages wait for a maintenance run that comes by chance (~12 min). Here the
maintenance runs at every fetch, there is no time limit and no retry by Dramatiq (a job's
deliveries are counted by the job's own hash instead: keys.MAX_DEATHS), and a host that sends
no heartbeat for `heartbeat_timeout` seconds is dead: its job is delivered again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit, urlunsplit

from sd_rest.cluster import keys

if TYPE_CHECKING:
    from dramatiq.brokers.redis import RedisBroker

BROKER_ENV: Final = "SD_REST_BROKER"
DEFAULT_HEARTBEAT_TIMEOUT: Final = 30.0
SCHEMES: Final = ("redis", "rediss")
MAINTENANCE_EVERY_FETCH: Final = 1_000_000  # Dramatiq's scale: a chance of 1 in 1


class BrokerMissing(RuntimeError):
    """The `cluster` extra is not installed."""


def check_url(url: str) -> str:
    """The URL if it is one Redis takes; ValueError in one line otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(
            f"the broker must be a redis:// or rediss:// URL (got {redact(url)!r}), e.g. "
            "redis://:password@192.168.1.10:6379/0"
        )
    if not parts.hostname:
        raise ValueError(f"the broker URL {redact(url)!r} names no host")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError(f"the broker URL {redact(url)!r} has a bad port") from None
    path = parts.path.lstrip("/")
    if path and not path.isdigit():
        raise ValueError(f"the broker URL's database must be a number, got {path!r}")
    return url


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, ""))


def make_broker(url: str, heartbeat_timeout: float, maintenance: bool = True) -> RedisBroker:
    """Dramatiq's Redis broker with sd-rest's options (see the module's docstring).

    `maintenance=False` for the API node's broker, which only enqueues: Dramatiq's cleanup
    (re-delivering the messages of consumers silent for `heartbeat_timeout`) then runs only
    on the worker hosts, with their timeout; an API node's shorter one would take live jobs
    for dead ones."""
    try:
        from dramatiq.brokers.redis import RedisBroker
        from dramatiq.middleware import ShutdownNotifications
    except ImportError as exc:
        raise BrokerMissing(
            "--broker needs the cluster extra: pip install 'sd-rest[cluster]' "
            "(dramatiq and redis)"
        ) from exc
    return RedisBroker(
        url=url,
        namespace=keys.DRAMATIQ_NAMESPACE,
        heartbeat_timeout=int(heartbeat_timeout * 1000),
        maintenance_chance=MAINTENANCE_EVERY_FETCH if maintenance else 0,
        middleware=[ShutdownNotifications()],
        socket_timeout=max(heartbeat_timeout, 10.0),
        socket_connect_timeout=5.0,
    )


def explain(exc: BaseException, url: str) -> str:
    """A Redis failure in one line that says what to fix."""
    import redis

    where = redact(url)
    if isinstance(exc, redis.AuthenticationError) or "WRONGPASS" in str(exc) or (
        "NOAUTH" in str(exc)
    ):
        return (
            f"Redis at {where} refused the password: put the one of its `requirepass` in "
            "the URL, redis://:PASSWORD@host:port/db"
        )
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
        return (
            f"cannot reach Redis at {where} ({exc}): is redis-server running there, and "
            "bound to an address this machine can reach?"
        )
    return f"Redis at {where} failed: {exc}"


def require_extra() -> None:
    """BrokerMissing (one line) when the `cluster` extra is not installed."""
    try:
        import dramatiq  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        raise BrokerMissing(
            f"--broker needs the cluster extra ({exc.name} is missing): "
            "pip install 'sd-rest[cluster]' (dramatiq and redis)"
        ) from exc


def probe(url: str, timeout: float = 3.0) -> str | None:
    """None when Redis at `url` answers a PING (with its password); else, in one line, why
    not. Blocking: for the command line's start."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return explain(exc, url)
    finally:
        client.close()
    return None
