"""The worker host's record in the registry (cluster.md): a JSON string at keys.worker(id),
set with an expiry of the heartbeat timeout and refreshed well within it by a thread of its
own, its id in keys.WORKERS; deleted on a clean exit. The API node lists the live ones in
`GET /` and prunes the ids whose record expired (a host that died).

The same thread keeps the host alive for Dramatiq: its Redis broker counts a host as alive
while the host's broker id in `<namespace>:__heartbeats__` is fresher than the heartbeat
timeout, and records it only when one of the host's consumers talks to Redis (dispatch.lua).
A host whose consumers all stopped fetching (a full host: capacity.py) would
look dead after the timeout, and its live job would be handed to another host. So the
heartbeat here writes that entry as well, the same ZADD as Dramatiq's: a host is alive for
as long as its process is, whatever its consumers do."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from sd_rest import __version__
from sd_rest.cluster import keys

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

MOST_APART: Final = 2.0  # seconds between two refreshes, at most


def refresh_every(heartbeat_timeout: float) -> float:
    return min(heartbeat_timeout / 3, MOST_APART)


def record(
    worker_id: str,
    host: str,
    pid: int,
    jobs: list[dict[str, str]],
    models: list[dict[str, Any]],
    served: int,
    concurrency: int,
    runner: str,
) -> dict[str, Any]:
    """The record, in the format both halves read (cluster.md)."""
    return {
        "id": worker_id,
        "host": host,
        "pid": pid,
        "state": "busy" if jobs else "idle",
        "jobs": jobs,
        "models": models,
        "served": served,
        "heartbeat": time.time(),
        "concurrency": concurrency,
        "runner": runner,
        "version": __version__,
    }


class Heartbeat:
    """Writes `describe()` every `refresh_every(timeout)` seconds until `stop`."""

    def __init__(
        self,
        client: redis.Redis,
        worker_id: str,
        heartbeat_timeout: float,
        describe: Callable[[], dict[str, Any]],
        dramatiq_id: str,
    ) -> None:
        self.client = client
        self.worker_id = worker_id
        self.dramatiq_id = dramatiq_id  # the broker's broker_id: the member Dramatiq watches
        self.timeout_ms = int(heartbeat_timeout * 1000)
        self.every = refresh_every(heartbeat_timeout)
        self.describe = describe
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="registry", daemon=True)
        self._failing: str | None = None  # "redis" or "bug" while refreshes fail

    def start(self) -> None:
        self.beat()  # listed before the first job can come
        self._thread.start()

    def beat(self) -> None:
        """One refresh. Never raises: Redis away is said once per outage; anything else (a
        bug) with its traceback, once until a refresh succeeds again, and the beats go on."""
        from redis.exceptions import RedisError

        try:
            self._write()
        except (RedisError, OSError) as exc:
            if self._failing is None:
                log.warning("the registry record could not be written: %s", exc)
            self._failing = "redis"
            return
        except Exception:
            if self._failing != "bug":
                log.exception("the registry record could not be written; trying again")
            self._failing = "bug"
            return
        if self._failing is not None:
            log.info("the registry record is written again")
        self._failing = None

    def _write(self) -> None:
        """Dramatiq's heartbeat (the host's liveness) and the record. A record that cannot be
        made (a bug) neither holds the heartbeat up nor takes the host off the list: the last
        record is kept alive, and the failure raised once both are written."""
        key = keys.worker(self.worker_id)
        pipe = self.client.pipeline()
        # Dramatiq's clock is the client's, in ms (RedisBroker._dispatch): the same here.
        pipe.zadd(keys.DRAMATIQ_HEARTBEATS, {self.dramatiq_id: int(time.time() * 1000)})
        failure: Exception | None = None
        try:
            pipe.set(key, json.dumps(self.describe()), px=self.timeout_ms)
        except Exception as exc:
            failure = exc
            pipe.pexpire(key, self.timeout_ms)
        pipe.sadd(keys.WORKERS, self.worker_id)
        pipe.execute()
        if failure is not None:
            raise failure

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self.beat()

    def stop(self) -> None:
        """Stop beating and delete the record: the host leaves the list at once."""
        from redis.exceptions import RedisError

        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self.client.delete(keys.worker(self.worker_id))
            self.client.srem(keys.WORKERS, self.worker_id)
        except (RedisError, OSError) as exc:
            log.warning("the registry record could not be deleted (it expires): %s", exc)
