"""The API node's commands to Redis (redis.asyncio): whether Redis answers, a job enqueued
(its hash and consumer group, then Dramatiq's message, then `enqueued=1`), read, canceled
(and its message taken back while no worker has it), and its keys deleted once it is
finished. Imported only with --broker: redis and dramatiq are the `cluster` extra."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

import redis
import redis.asyncio as aredis

from sd_rest.cluster import broker, keys
from sd_rest.cluster.message import JobMessage, dramatiq_message
from sd_rest.cluster.message import redis_id as message_id

log = logging.getLogger(__name__)

PING_TIMEOUT: Final = 1.0  # seconds a POST waits to learn whether Redis answers
COMMAND_TIMEOUT: Final = 5.0  # a command's socket timeout (not the follower's blocked read)
# Connections per client: a burst of commands (1,000 jobs attaching at a start) waits for a
# free one instead of failing past redis-py's own limit.
MAX_CONNECTIONS: Final = 32
# What redis-py raises when Redis cannot be reached or talked to.
UNREACHABLE: Final = (redis.ConnectionError, redis.TimeoutError, OSError, asyncio.TimeoutError)
# Any failure of a command: the above, or an error Redis answered with (a wrong password...).
FAILURES: Final = (*UNREACHABLE, redis.RedisError)


def client(url: str, socket_timeout: float = COMMAND_TIMEOUT) -> aredis.Redis:
    pool = aredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=socket_timeout,  # waiting for a free connection
        socket_connect_timeout=2.0,
        socket_timeout=socket_timeout,
        retry_on_timeout=False,
    )
    return aredis.Redis.from_pool(pool)


async def ensure_group(redis_: aredis.Redis, stream: str, first: str = "0") -> None:
    """The API node's consumer group on `stream` (made with it), reading from `first`."""
    try:
        await redis_.xgroup_create(stream, keys.GROUP, id=first, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


# Takes a job's message back from its Dramatiq queue (a canceled job no worker has taken).
_UNSEND: Final = """
local removed = redis.call('LREM', KEYS[1], 0, ARGV[1])
if removed > 0 then redis.call('HDEL', KEYS[2], ARGV[1]) end
return removed
"""


# A send's last step (cluster.md): `enqueued=1` and the message's id, unless the job was
# canceled (or finished, its hash deleted) while Dramatiq took the message: then the message
# is taken back and nothing written, so a DELETE during the send never brings the hash back.
# KEYS: job hash, Dramatiq's queue list, its bodies; ARGV: the message's Redis id.
_SENT: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HGET', KEYS[1], 'canceled') == '1' then
  if redis.call('LREM', KEYS[2], 0, ARGV[1]) > 0 then redis.call('HDEL', KEYS[3], ARGV[1]) end
  return 0
end
redis.call('HSET', KEYS[1], 'enqueued', '1', 'message', ARGV[1])
return 1
"""

# A job's keys dropped as stale: the hash (if it still belongs to the run `seq`; "" matches
# a hash without one), its stream, its message taken back from Dramatiq's queue.
# KEYS: job hash, stream, queue list, bodies; ARGV: seq, the message's Redis id ("" = none).
_DISCARD: Final = """
if (redis.call('HGET', KEYS[1], 'seq') or '') ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' and redis.call('LREM', KEYS[3], 0, ARGV[2]) > 0 then
  redis.call('HDEL', KEYS[4], ARGV[2])
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""


class NodeRedis:
    def __init__(self, url: str, heartbeat_timeout: float) -> None:
        self.url = url
        self.heartbeat_timeout = heartbeat_timeout
        self.redis = client(url)
        self._broker: Any = None  # Dramatiq's broker (its own, blocking, client): made once

    async def close(self) -> None:
        await self.redis.aclose()
        if self._broker is not None:
            await asyncio.to_thread(self._broker.close)

    async def unavailable(self) -> str | None:
        """None when Redis answers a PING within PING_TIMEOUT; else why not, in one line."""
        try:
            await asyncio.wait_for(self.redis.ping(), PING_TIMEOUT)
        except FAILURES as exc:
            if isinstance(exc, asyncio.TimeoutError):
                exc = TimeoutError(f"no answer within {PING_TIMEOUT:g} s")
            return broker.explain(exc, self.url)
        return None

    async def job(self, endpoint: str, id_: str) -> dict[str, str] | None:
        """The job's hash, or None when Redis has none (it lost it, or it was never made)."""
        raw = await self.redis.hgetall(keys.job(endpoint, id_))
        if not raw:
            return None
        return {k.decode(): v.decode("utf-8", "replace") for k, v in raw.items()}

    async def create(self, endpoint: str, id_: str, queue: str, made: int, seq: int) -> None:
        """A fresh hash and stream, with the API node's consumer group: what enqueue writes
        before Dramatiq has the message (a stream of an earlier run goes first). `seq`: the
        job's submission number, which a retry changes: a hash of another seq is stale."""
        stream = keys.stream(endpoint, id_)
        fields = {
            "queue": queue, "made": made, "enqueued": 0, "canceled": 0, "deliveries": 0,
            "seq": seq,
        }  # fmt: skip
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(stream, keys.job(endpoint, id_))
            pipe.hset(keys.job(endpoint, id_), mapping=fields)
            await pipe.execute()
        await ensure_group(self.redis, stream)

    async def send(self, queue: str, message: JobMessage) -> None:
        """Dramatiq's message for the job, then `enqueued=1` in its hash: both or, when the
        caller is cancelled meanwhile (this node stopping), both still (shielded), so that
        a message sent is never sent again by the next start."""
        await asyncio.shield(self._send(queue, message))

    async def _send(self, queue: str, message: JobMessage) -> None:
        if self._broker is None:
            self._broker = broker.make_broker(self.url, self.heartbeat_timeout, maintenance=False)
        sent = await asyncio.to_thread(self._broker.enqueue, dramatiq_message(queue, message))
        redis_id = message_id(sent)  # to take it back
        job = keys.job(message.endpoint, message.id)
        if not await self.redis.eval(_SENT, 3, job, *keys.dramatiq_queue(queue), redis_id):
            log.info("job %s/%s: canceled while it was sent; its message is taken back",
                     message.endpoint, message.id)  # fmt: skip

    async def cancel(self, endpoint: str, id_: str) -> None:
        """`canceled=1` (a worker taking the message later never runs it), then the news to
        the worker host running it, and the message taken back from its queue if no worker
        has taken it yet (its input files would stay in Redis for good otherwise)."""
        job = keys.job(endpoint, id_)
        if await self.redis.exists(job):
            await self.redis.hset(job, "canceled", 1)
        await self.redis.publish(keys.CANCEL_CHANNEL, f"{endpoint}:{id_}")
        queue, message = await self.redis.hmget(job, ["queue", "message"])
        if queue and message:
            await self.redis.eval(_UNSEND, 2, *keys.dramatiq_queue(queue.decode()), message)

    async def discard(self, endpoint: str, id_: str, state: dict[str, str]) -> bool:
        """Drop a stale hash (`state`, as read) with its stream and the message still in its
        queue; False when the hash changed meanwhile (a newer run made it)."""
        queue, message = state.get("queue", ""), state.get("message", "")
        dropped = await self.redis.eval(
            _DISCARD, 4, keys.job(endpoint, id_), keys.stream(endpoint, id_),
            *keys.dramatiq_queue(queue), state.get("seq", ""), message,
        )  # fmt: skip
        return bool(dropped)

    async def job_hashes(self, count: int = 500) -> AsyncIterator[tuple[str, str, dict[str, str]]]:
        """Every job hash in Redis: (endpoint, id, its fields)."""
        prefix = keys.job("", "")[:-1]  # "sd-rest:job:"
        async for raw in self.redis.scan_iter(match=f"{prefix}*", count=count, _type="hash"):
            name = raw.decode("utf-8", "replace")
            endpoint, _, id_ = name[len(prefix) :].partition(":")
            state = await self.job(endpoint, id_)
            if state is not None and keys.job(endpoint, id_) == name:
                yield endpoint, id_, state

    async def forget(self, endpoint: str, id_: str) -> None:
        """A finished job: its hash and stream are no longer needed."""
        await self.redis.delete(keys.job(endpoint, id_), keys.stream(endpoint, id_))
