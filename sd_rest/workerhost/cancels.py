"""Cancels from the API node: it sets the job's `canceled` and publishes "<endpoint>:<id>" on
keys.CANCEL_CHANNEL; a thread here listens and ends the matching local run (its script ends
within a second). A cancel missed while Redis was unreachable is still seen: the job's next
add through the fence answers "canceled"."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from sd_rest.cluster import keys

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

LISTEN_TIMEOUT: Final = 0.5  # seconds a wait for a message lasts, so that a stop is seen
RECONNECT_AFTER: Final = 1.0


def parse(data: bytes | str) -> tuple[str, str] | None:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    endpoint, sep, job_id = text.partition(":")
    return (endpoint, job_id) if sep and endpoint and job_id else None


class CancelListener:
    def __init__(self, client: redis.Redis, on_cancel: Callable[[str, str], None]) -> None:
        self.client = client
        self.on_cancel = on_cancel
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="cancels", daemon=True)

    def start(self, timeout: float = 5.0) -> None:
        """Listening once this returns (or after `timeout`, Redis being slow)."""
        self._thread.start()
        self._subscribed.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(LISTEN_TIMEOUT * 4)

    def _listen(self) -> None:
        """Until `stop`, whatever fails: Redis away is said once a minute at most (quiet.py),
        anything else (a bug) with its traceback, and listening goes on."""
        from redis.exceptions import RedisError

        while not self._stop.is_set():
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            except Exception:
                log.exception("the cancel listener failed; it listens again in a moment")
                time.sleep(RECONNECT_AFTER)
                continue
            try:
                pubsub.subscribe(keys.CANCEL_CHANNEL)
                self._subscribed.set()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=LISTEN_TIMEOUT)
                    if message is not None and message.get("type") == "message":
                        self._deliver(message["data"])
            except (RedisError, OSError) as exc:
                log.warning("listening for cancels: %s; again in %.0f s", exc, RECONNECT_AFTER)
                time.sleep(RECONNECT_AFTER)
            except Exception:
                log.exception("the cancel listener failed; it listens again in a moment")
                time.sleep(RECONNECT_AFTER)
            finally:
                _close(pubsub)

    def _deliver(self, data: bytes | str) -> None:
        """One cancel to its run; a failure is this cancel's alone (the next ones still come,
        and the canceled run learns it at its next add through the fence anyway)."""
        key = parse(data)
        if key is None:
            return
        try:
            self.on_cancel(*key)
        except Exception:
            log.exception("the cancel of job %s/%s failed", *key)


def _close(pubsub: redis.client.PubSub) -> None:
    try:
        pubsub.close()
    except Exception:
        log.exception("closing the cancels' subscription failed")
