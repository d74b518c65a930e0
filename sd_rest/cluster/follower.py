"""The API node's reader of the job streams: one task, one `XREADGROUP` over the streams of
the followed jobs a worker has started (the active ones) and the notify stream.

A job is followed from its enqueue, but its stream is read only once active: the fence's
START announces each started job on keys.NOTIFY, and a job found started in Redis (this node
restarted, Redis came back) is active at once. So 1,000 queued jobs cost the reader nothing.

An active stream is first read from `0`: the entries delivered to this node before it died
and never acknowledged; then from `>`, the new ones. Each stream's entries are handled in
order by a task of its own (an image's fsync holds up only its own job), and acknowledged
and deleted once the target returns (its effect is durable). A target that fails with OSError
(the disk refused) is given the same entry again after a pause. A job's `end` is never
acknowledged: it stays pending until the job's keys are deleted, after its outcome is durable,
so an API node that dies in between reads it again.

While Redis cannot be reached the reader retries with backoff; once it answers again, the
jobs whose hash is gone or whose message may not have been sent are told (`redis_back`), one
at a time, and every active stream is read from its pending entries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Final, Protocol

import redis

from sd_rest.cluster import keys
from sd_rest.cluster.connection import FAILURES, client, ensure_group
from sd_rest.cluster.entries import BadEntry, End, Entry, decode

log = logging.getLogger(__name__)

CONSUMER: Final = "api"
BLOCK_MS: Final = 5000
SHORT_BLOCK_MS: Final = 50
# An image entry holds a PNG (1-3 MB): after a long outage of this node every finished job's
# stream is read at once, so what one read may bring is bounded in entries per stream, in
# streams per read (the others in turn, at the next reads), and by the bytes read but not
# yet handled, per stream and in all.
BATCH: Final = 8
STREAMS_PER_READ: Final = 16
BACKLOG_BYTES: Final = 32 * 2**20  # per stream
TOTAL_BACKLOG_BYTES: Final = 128 * 2**20
BACKOFF_FIRST: Final = 0.1
BACKOFF_MOST: Final = 2.0
PENDING: Final = "0"
NEW: Final = ">"

RawEntry = tuple[bytes, dict[bytes, bytes]]


class Target(Protocol):
    async def entry(self, entry: Entry) -> None:
        """The entry's effect, durable when this returns (OSError: try again later)."""
        ...

    async def redis_back(self) -> None:
        """Redis answers again after it could not be reached, and the job's hash is gone or
        says its message may not have been sent: enqueue it (again)."""
        ...


@dataclass
class _Followed:
    target: Target
    job: str  # its hash
    active: bool = False
    cursor: str = PENDING  # PENDING, an id (pending entries after it), or NEW
    backlog: deque[RawEntry] = field(default_factory=deque)
    backlog_bytes: int = 0  # of the entries in backlog
    task: asyncio.Task[None] | None = None

    def add(self, entries: list[RawEntry]) -> None:
        self.backlog.extend(entries)
        self.backlog_bytes += sum(entry_size(entry) for entry in entries)

    def pop(self) -> None:
        self.backlog_bytes -= entry_size(self.backlog.popleft())

    def clear(self) -> None:
        self.backlog.clear()
        self.backlog_bytes = 0


def entry_size(entry: RawEntry) -> int:
    return len(entry[0]) + sum(len(k) + len(v) for k, v in entry[1].items())


def to_read(streams: list[tuple[str, int]], total: int, start: int) -> list[str]:
    """Which of the active streams (name, bytes read but not handled) one read asks for:
    none while `total` such bytes reach TOTAL_BACKLOG_BYTES; else those under BACKLOG_BYTES,
    at most STREAMS_PER_READ of them, taken in turn from position `start`."""
    if total >= TOTAL_BACKLOG_BYTES or not streams:
        return []
    start %= len(streams)
    turn = streams[start:] + streams[:start]
    return [name for name, held in turn if held < BACKLOG_BYTES][:STREAMS_PER_READ]


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
        self._turn = 0  # where the next read starts among the active streams

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster-follower")

    async def close(self) -> None:
        tasks = [self._task, self._waking, *(f.task for f in self._streams.values())]
        for task in tasks:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
        await self.redis.aclose()

    def follow(self, stream: str, job: str, target: Target, active: bool) -> None:
        """Follow `stream` (job hash `job`); read it now if `active` (a worker started it),
        else once the notify stream says a worker did."""
        old = self._streams.get(stream)
        self._streams[stream] = _Followed(target, job)
        if old is not None and old.task is not None:
            old.task.cancel()
        if active:
            self.activate(stream)

    def activate(self, stream: str) -> None:
        followed = self._streams.get(stream)
        if followed is not None and not followed.active:
            followed.active = True
            followed.cursor = PENDING
            self.wake()

    def unfollow(self, stream: str) -> None:
        followed = self._streams.pop(stream, None)
        if followed is not None and followed.task is not None:
            followed.task.cancel()

    def _held(self) -> int:
        """Bytes read and not yet handled, over every followed stream."""
        return sum(one.backlog_bytes for one in self._streams.values())

    def wake(self) -> None:
        """The blocked read ends at once (it reads a changed set of streams)."""
        if self._waking is None or self._waking.done():
            self._waking = asyncio.create_task(self._wake())

    async def _wake(self) -> None:
        with contextlib.suppress(*FAILURES):  # then the reader is retrying already
            await self.redis.xadd(keys.NOTIFY, {"wake": 1}, maxlen=keys.NOTIFY_MAXLEN)

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            try:
                if not self.reachable:
                    await self.redis.ping()
                    await self._back()
                await self._read()
                backoff = BACKOFF_FIRST
            except FAILURES as exc:
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
        """Redis answers again: one pipelined look at every followed job's hash; a job whose
        hash is gone or not marked enqueued is told, one at a time; a started one is active;
        every active stream is read from its pending entries (read, never acknowledged)."""
        if self._outage:
            log.info("Redis answers: checking the %d followed job(s)", len(self._streams))
        await ensure_group(self.redis, keys.NOTIFY)
        followed = list(self._streams.items())
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, one in followed:
                pipe.hmget(one.job, ["queue", "enqueued", "attempt"])
            states = await pipe.execute()
        for (name, one), (queue, enqueued, attempt) in zip(followed, states, strict=True):
            if self._streams.get(name) is not one:
                continue
            if queue is None or enqueued != b"1":
                try:
                    await one.target.redis_back()
                except FAILURES:
                    raise  # Redis failed again: the whole look is made again, later
                except Exception:  # one job's trouble must not hold the others up
                    log.exception("job stream %s: checking it again failed", name)
                continue
            await ensure_group(self.redis, name)
            one.clear()  # read again from the pending entries
            one.cursor = PENDING
            one.active = one.active or bool(attempt)
        self.reachable = True
        self._outage = False

    async def _read(self) -> None:
        active = [(name, one.backlog_bytes) for name, one in self._streams.items() if one.active]
        chosen = to_read(active, self._held(), self._turn)
        self._turn += STREAMS_PER_READ
        wanted = {name: self._streams[name].cursor for name in chosen}
        wanted[keys.NOTIFY] = NEW
        # Streams left for the next turn: a short wait, so their entries are not held up.
        block = BLOCK_MS if len(chosen) == len(active) else SHORT_BLOCK_MS
        try:
            reply = await self.redis.xreadgroup(
                keys.GROUP, CONSUMER, wanted, count=BATCH, block=block  # type: ignore[arg-type]
            )
        except redis.ResponseError as exc:
            if "UNBLOCKED" in str(exc):
                return  # a finished job's stream deleted under the read: read the others
            if "NOGROUP" not in str(exc):
                raise
            # A stream or its group is gone: Redis restarted empty, most likely.
            self.reachable = False
            await asyncio.sleep(BACKOFF_FIRST)
            return
        for raw_name, entries in reply or []:
            name = raw_name.decode()
            if name == keys.NOTIFY:
                await self._notices(entries)
                continue
            followed = self._streams.get(name)
            if followed is None:
                continue
            if followed.cursor != NEW:
                # Pending entries, in id order: go on after the last one; none left: new ones.
                followed.cursor = entries[-1][0].decode() if entries else NEW
            followed.add(entries)
            if followed.task is None or followed.task.done():
                followed.task = asyncio.create_task(self._handle(name, followed))

    async def _notices(self, entries: list[RawEntry]) -> None:
        for _, fields in entries:
            stream = fields.get(b"job")
            if stream is not None:
                self.activate(stream.decode())
        await self._done(keys.NOTIFY, [entry_id for entry_id, _ in entries])

    async def _handle(self, name: str, followed: _Followed) -> None:
        """The stream's entries read so far, in order (a task per stream)."""
        throttled = (
            followed.backlog_bytes >= BACKLOG_BYTES
            or self._held() >= TOTAL_BACKLOG_BYTES
        )
        while followed.backlog and self._streams.get(name) is followed:
            entry_id, fields = followed.backlog[0]
            keep = await self._apply(name, followed, entry_id, fields)
            if followed.backlog and followed.backlog[0][0] == entry_id:
                followed.pop()
            if not keep:
                # Else acknowledged once it is read again (handling it again changes nothing).
                with contextlib.suppress(*FAILURES):
                    await self._done(name, [entry_id])
        if throttled:
            self.wake()  # it was left out of the read: read it again at once

    async def _apply(
        self, name: str, followed: _Followed, entry_id: bytes, fields: dict[bytes, bytes]
    ) -> bool:
        """The entry's effect; True when it must stay pending (a job's end)."""
        if not fields:  # a pending entry deleted since reads back empty
            return False
        try:
            entry = decode(fields)
        except BadEntry as exc:
            log.warning("skipping entry %s of %s: %s", entry_id.decode(), name, exc)
            return False
        while self._streams.get(name) is followed:
            try:
                await followed.target.entry(entry)
                break
            except OSError as exc:
                log.warning("%s: entry %s not kept yet (%s)", name, entry_id.decode(), exc)
                await asyncio.sleep(BACKOFF_MOST)  # then the same entry again
            except Exception:  # one entry must not stop the job's others, nor other jobs
                log.exception("%s: entry %s could not be handled", name, entry_id.decode())
                break
        return isinstance(entry, End) and entry.outcome != "stopped"

    async def _done(self, name: str, ids: list[bytes]) -> None:
        if not ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(name, keys.GROUP, *ids)
            pipe.xdel(name, *ids)
            await pipe.execute()
