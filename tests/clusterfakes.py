"""A stand-in for a worker host, for the API node's tests (test_cluster_node.py): it takes
the Dramatiq message of a job with Dramatiq's own consumer, and writes the job's stream the
way cluster.md's fence does (START and ADD, here as plain redis-py calls in a test, not the
Lua scripts), with the codecs of sd_rest/cluster/entries.py. It also writes worker records as
a worker host's heartbeat does.

It stands in for the real worker host (sd_rest/workerhost, written at the same time): once
that exists, the lead may replace this module with real worker processes; the tests only use
`take`, `start`, `progress`, `image`, `end` and `register`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from sd_rest.cluster import entries, keys
from sd_rest.cluster.broker import make_broker
from sd_rest.cluster.message import JobMessage


@dataclass
class Attempt:
    endpoint: str
    id: str
    attempt: str
    made: int  # images the job had when this attempt started (it resumes after them)


@dataclass
class StandInWorker:
    url: str
    host: str = "stand-in-host"
    pid: int = 4242
    worker_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        self.redis = redis.Redis.from_url(self.url)
        self.broker = make_broker(self.url, 30.0)

    def close(self) -> None:
        self.broker.close()
        self.redis.close()

    @property
    def ref(self) -> entries.WorkerRef:
        return entries.WorkerRef(self.host, self.pid, self.worker_id)

    # --- the queue --------------------------------------------------------------------

    def take(self, queue: str, timeout: float = 20.0) -> JobMessage:
        """The next message of `queue`, acknowledged (as a worker does once the job ends)."""
        consumer = self.broker.consume(queue, prefetch=1, timeout=100)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                proxy = next(consumer)
                if proxy is None:
                    continue
                consumer.ack(proxy)
                assert proxy.actor_name == keys.ACTOR
                return JobMessage.from_json(proxy.args[0])
        finally:
            consumer.close()
        raise AssertionError(f"no message on {queue} within {timeout} s")

    # --- the fence, as cluster.md says it -----------------------------------------------

    def start(self, endpoint: str, id_: str) -> Attempt | str:
        """START: "gone", "canceled", "dead", or the attempt that runs."""
        job, stream = keys.job(endpoint, id_), keys.stream(endpoint, id_)
        state = {k.decode(): v.decode() for k, v in self.redis.hgetall(job).items()}
        if not state:
            return "gone"
        if state.get("canceled") == "1":
            return "canceled"
        deliveries = self.redis.hincrby(job, "deliveries", 1)
        previous = state.get("worker")
        if previous and deliveries > 1:
            dead = json.loads(previous)
            deaths = (state.get("deaths", "") + f"{dead['host']} (pid {dead['pid']}); ").strip()
            self.redis.hset(job, "deaths", deaths)
        attempt = uuid.uuid4().hex
        self.redis.hset(job, mapping={"attempt": attempt, "worker": json.dumps(self.ref.to_json())})
        if deliveries > keys.MAX_DEATHS:
            deaths = self.redis.hget(job, "deaths").decode()
            error = f"its worker died {keys.MAX_DEATHS} times: {deaths}"
            self.redis.xadd(stream, entries.end(attempt, "failed", error, b""))
            return "dead"
        self.redis.xadd(stream, entries.started(attempt, self.ref, deliveries))
        return Attempt(endpoint, id_, attempt, int(state["made"]))

    def add(self, run: Attempt, fields: entries.Fields, n: int = 0) -> int:
        """ADD: 1 added, 0 superseded (or an image out of turn), -1 canceled."""
        job, stream = keys.job(run.endpoint, run.id), keys.stream(run.endpoint, run.id)
        state = {k.decode(): v.decode() for k, v in self.redis.hgetall(job).items()}
        if state.get("attempt") != run.attempt:
            return 0
        kind = fields["kind"]
        if state.get("canceled") == "1" and kind != entries.END:
            return -1
        if kind == entries.IMAGE:
            if n != int(state["made"]) + 1:
                return 0
            self.redis.hset(job, "made", n)
        if kind == entries.END and fields["outcome"] == "stopped":
            self.redis.hincrby(job, "deliveries", -1)
            self.redis.hdel(job, "worker")
        self.redis.xadd(stream, fields)
        return 1

    def progress(self, run: Attempt, index: int, fraction: float) -> int:
        return self.add(run, entries.progress(run.attempt, index, fraction))

    def image(self, run: Attempt, n: int, png: bytes, seed: int, position: int) -> int:
        return self.add(run, entries.image(run.attempt, n, seed, position, png), n)

    def end(self, run: Attempt, outcome: entries.Outcome, error: str | None = None) -> int:
        return self.add(run, entries.end(run.attempt, outcome, error, b"stand-in log tail\n"))

    # --- the registry -------------------------------------------------------------------

    def register(self, models: list[dict[str, Any]], ttl: float = 30.0, **more: Any) -> None:
        """This worker's record, as its heartbeat writes it."""
        record = {
            "id": self.worker_id, "host": self.host, "pid": self.pid, "state": "idle",
            "jobs": [], "models": models, "served": 0, "heartbeat": time.time(),
            "concurrency": 1, "runner": "resident", "version": "test", **more,
        }  # fmt: skip
        self.redis.set(keys.worker(self.worker_id), json.dumps(record), px=int(ttl * 1000))
        self.redis.sadd(keys.WORKERS, self.worker_id)
