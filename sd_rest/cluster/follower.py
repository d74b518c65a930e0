"""The API node's reader of the job streams: one task, one `XREADGROUP` over every followed
stream (and the wake-up stream, so that a stream followed meanwhile is read at once).

A stream is first read from `0`: the entries delivered to this node before it died and never
acknowledged; then from `>`, the new ones. Each entry goes to its job's target, and is
acknowledged and deleted only once the target returns (its effect is durable). A target that
fails with OSError (the disk refused) leaves the entry pending: it is read again later.

While Redis cannot be reached the reader retries with backoff; once it answers again every
target is told (`redis_back`: its job's hash may be gone, Redis may have restarted empty) and
every stream is read from its pending entries again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Final, Protocol

import redis

from sd_rest.cluster import keys
from sd_rest.cluster.connection import UNREACHABLE, client
from sd_rest.cluster.entries import BadEntry, Entry, decode

log = logging.getLogger(__name__)

CONSUMER: Final = "api"
BLOCK_MS: Final = 5000
BATCH: Final = 100
BACKOFF_FIRST: Final = 0.1
BACKOFF_MOST: Final = 2.0
PENDING: Final = "0"
NEW: Final = ">"


class Target(Protocol):
    async def entry(self, entry: Entry) -> None:
        """The entry's effect, durable when this returns (OSError: try again later)."""
        ...

    async def redis_back(self) -> None:
        """Redis answers again after it could not be reached: check the job's hash."""
        ...


@dataclass
class _Followed:
    target: Target
    cursor: str = PENDING


class Follower:
    def __init__(self, url: str) -> None:
        self.url = url
        self.redis = client(url, socket_timeout=BLOCK_MS / 1000 + 5)
        self._streams: dict[str, _Followed] = {}
        self._task: asyncio.Task[None] | None = None
        self._waking: asyncio.Task[None] | None = None
        # False until the first read, and while Redis cannot be reached or lost a stream.
        self.reachable = False
        self._outage = False  # a real one (logged), not a stream deleted under a read

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster-follower")

    async def close(self) -> None:
        for task in (self._task, self._waking):
            if task is not None:
                task.cancel()
        for task in (self._task, self._waking):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        await self.redis.aclose()

    def follow(self, stream: str, target: Target) -> None:
        self._streams[stream] = _Followed(target)
        if self._waking is None or self._waking.done():
            self._waking = asyncio.create_task(self._wake())

    def unfollow(self, stream: str) -> None:
        self._streams.pop(stream, None)

    async def _wake(self) -> None:
        try:
            await self.redis.xadd(keys.WAKE, {"wake": 1}, maxlen=100, approximate=True)
        except (*UNREACHABLE, redis.RedisError):
            pass  # the reader is not blocked then: it is retrying already

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            try:
                if not self.reachable:
                    await self.redis.ping()
                    await self._back()
                await self._read()
                backoff = BACKOFF_FIRST
            except (*UNREACHABLE, redis.RedisError) as exc:
                if not self._outage:
                    log.warning("the job streams cannot be read (%s): retrying", exc)
                self.reachable = False
                self._outage = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MOST)
            except Exception:  # the reader must go on: every remote job depends on it
                log.exception("reading the job streams failed")
                await asyncio.sleep(BACKOFF_MOST)

    async def _back(self) -> None:
        """Redis answers again: every job checks its hash; every stream is read from its
        pending entries (some may have been read and not acknowledged)."""
        if self._outage:
            log.info("Redis answers: checking the %d followed job(s)", len(self._streams))
        await self._ensure_group(keys.WAKE)
        for followed in list(self._streams.values()):
            followed.cursor = PENDING
        await asyncio.gather(*(f.target.redis_back() for f in list(self._streams.values())))
        self.reachable = True
        self._outage = False

    async def _ensure_group(self, stream: str) -> None:
        try:
            await self.redis.xgroup_create(stream, keys.GROUP, id="$", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _read(self) -> None:
        wanted = {name: followed.cursor for name, followed in self._streams.items()}
        wanted[keys.WAKE] = NEW
        try:
            reply = await self.redis.xreadgroup(
                keys.GROUP, CONSUMER, wanted, count=BATCH, block=BLOCK_MS  # type: ignore[arg-type]
            )
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                raise
            # A stream or its group is gone: most often a finished job's, deleted under the
            # blocked read; or Redis restarted empty. Each followed job checks its hash.
            self.reachable = False
            return
        for raw_name, entries in reply or []:
            name = raw_name.decode()
            if name == keys.WAKE:
                await self._done(name, [entry_id for entry_id, _ in entries])
                continue
            followed = self._streams.get(name)
            if followed is None:
                continue
            if followed.cursor == PENDING and not entries:
                followed.cursor = NEW  # no pending entry left: the new ones from now on
                continue
            await self._handle(name, followed, entries)

    async def _handle(
        self, name: str, followed: _Followed, entries: list[tuple[bytes, dict[bytes, bytes]]]
    ) -> None:
        for entry_id, fields in entries:
            if self._streams.get(name) is not followed:
                return  # unfollowed meanwhile: its job is finished
            if fields:  # a pending entry deleted since reads back empty
                try:
                    entry = decode(fields)
                except BadEntry as exc:
                    log.warning("skipping entry %s of %s: %s", entry_id.decode(), name, exc)
                else:
                    try:
                        await followed.target.entry(entry)
                    except OSError as exc:
                        log.warning("%s: entry %s not kept yet (%s)", name, entry_id, exc)
                        followed.cursor = PENDING  # read again, after a pause
                        await asyncio.sleep(BACKOFF_MOST)
                        return
            await self._done(name, [entry_id])

    async def _done(self, name: str, ids: list[bytes]) -> None:
        if not ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(name, keys.GROUP, *ids)
            pipe.xdel(name, *ids)
            await pipe.execute()
