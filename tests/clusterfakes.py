"""A worker host driven step by step, for the API node's tests (test_cluster_node.py) that
need entries a real host would only write by chance (an old attempt's late image, a stop at
a chosen moment, an end the node must read after its restart): it takes the Dramatiq message
of a job with Dramatiq's own consumer and writes the job's stream through the real fence
(cluster/fence.py), with the codecs of cluster/entries.py. It also writes worker records as a
worker host's heartbeat does. Tests that need no such control use real worker hosts
(clusterhosts.py)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

from sd_rest.cluster import entries, keys
from sd_rest.cluster.broker import make_broker
from sd_rest.cluster.fence import Fence
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
        self.fence = Fence(self.redis)
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

    # --- the fence (cluster/fence.py's scripts) ---------------------------------------

    def start(self, endpoint: str, id_: str) -> Attempt | str:
        """START: "gone", "canceled", "dead", or the attempt that runs."""
        attempt = uuid.uuid4().hex
        answer = self.fence.start(endpoint, id_, attempt, self.ref)
        if answer.verdict != "run":
            return answer.verdict
        return Attempt(endpoint, id_, attempt, answer.made)

    def add(self, run: Attempt, fields: entries.Fields, n: int = 0) -> int:
        """ADD: 1 added, 0 superseded (or an image out of turn), -1 canceled."""
        return self.fence.add(run.endpoint, run.id, run.attempt, fields)

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
