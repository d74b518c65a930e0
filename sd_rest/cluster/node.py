"""The API node's side of the cluster in one object: its commands to Redis (connection.py),
the reader of the job streams (follower.py) and the cache of the live worker hosts
(registry.py). Made by the runners when the server has --broker; the only module the layers
above import from here (with broker.py for the command line)."""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from sd_rest.cluster.connection import FAILURES, NodeRedis
from sd_rest.cluster.follower import Follower
from sd_rest.cluster.registry import Registry

log = logging.getLogger(__name__)

# The later commands a job's end needs (delete its keys) when Redis did not take them then.
RETRY_EVERY: Final = 2.0


class ClusterNode:
    def __init__(self, url: str, heartbeat_timeout: float) -> None:
        self.url = url
        self.heartbeat_timeout = heartbeat_timeout
        self.redis = NodeRedis(url, heartbeat_timeout)
        self.follower = Follower(url)
        self.registry = Registry(url)
        self._forget_later: set[tuple[str, str]] = set()
        self._retrier: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.follower.start()
        self.registry.start()
        self._retrier = asyncio.create_task(self._retry_forgets())

    async def close(self) -> None:
        if self._retrier is not None:
            self._retrier.cancel()
            await asyncio.gather(self._retrier, return_exceptions=True)
        await self.follower.close()
        await self.registry.close()
        await self.redis.close()

    async def forget(self, endpoint: str, id_: str) -> None:
        """Delete a finished job's keys (its outcome is durable here), now or later."""
        try:
            await self.redis.forget(endpoint, id_)
        except FAILURES as exc:
            log.info("job %s/%s: its keys are deleted later (%s)", endpoint, id_, exc)
            self._forget_later.add((endpoint, id_))

    async def _retry_forgets(self) -> None:
        while True:
            await asyncio.sleep(RETRY_EVERY)
            for key in list(self._forget_later):
                try:
                    await self.redis.forget(*key)
                except FAILURES:
                    break
                except Exception:  # this loop must go on: it is the only one to retry
                    log.exception("deleting the keys of job %s/%s failed", *key)
                    break
                self._forget_later.discard(key)
