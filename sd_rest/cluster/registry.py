"""The live worker hosts, as the API node knows them: their records (each one's own key, kept
alive by its heartbeat) read about every second into a cache, so that `GET /` and the jobs'
waiting reasons never wait on Redis. Ids whose record expired (a host that died) are pruned
from the set."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Final

from sd_rest.cluster import keys
from sd_rest.cluster.connection import FAILURES, client

log = logging.getLogger(__name__)

REFRESH_EVERY: Final = 1.0


class Registry:
    def __init__(self, url: str) -> None:
        self.redis = client(url)
        self.records: list[dict[str, Any]] = []
        self.reachable = False  # the last read succeeded
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster-registry")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.redis.aclose()

    async def _run(self) -> None:
        while True:
            try:
                self.records = await self.refresh()
                self.reachable = True
            except Exception as exc:  # whatever it is, the loop goes on: GET / reads it
                if self.reachable:
                    log.warning("the worker hosts cannot be read from Redis: %s", exc)
                if not isinstance(exc, FAILURES):
                    log.exception("reading the worker hosts failed")
                self.reachable = False
                self.records = []
            self._changed.set()
            self._changed = asyncio.Event()
            await asyncio.sleep(REFRESH_EVERY)

    async def changed(self) -> None:
        """Returns at the next refresh."""
        await self._changed.wait()

    async def refresh(self) -> list[dict[str, Any]]:
        ids = sorted(member.decode() for member in await self.redis.smembers(keys.WORKERS))
        if not ids:
            return []
        values = await self.redis.mget([keys.worker(id_) for id_ in ids])
        expired = [id_ for id_, value in zip(ids, values, strict=True) if value is None]
        if expired:
            await self.redis.srem(keys.WORKERS, *expired)
        records = []
        for id_, value in zip(ids, values, strict=True):
            record = parse(value) if value is not None else None
            if record is not None:
                records.append(record)
            elif value is not None:
                log.debug("worker %s: a record that is not one of ours", id_)
        return records

    def record(self, worker_id: str | None, host: str, pid: int) -> dict[str, Any] | None:
        """The live record of a worker: by its id (containers share pid 1, so host and pid
        may name two hosts); by host and pid only for a worker known without its id (a
        sidecar written before the id was kept). None when it is not live."""
        for record in self.records:
            if worker_id is not None:
                if record.get("id") == worker_id:
                    return record
            elif record.get("host") == host and record.get("pid") == pid:
                return record
        return None

    def serves(self, queue: str) -> bool:
        """Whether a live worker host consumes `queue` (holds the checkpoint it names)."""
        return any(queue in model_queues(record) for record in self.records)


def parse(value: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(value)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("models", []), list):
        return None
    return record


def runs(record: dict[str, Any], endpoint: str, id_: str) -> bool | None:
    """Whether a worker's record lists the job among its jobs (None: a record without a list
    of jobs, which says nothing either way)."""
    jobs = record.get("jobs")
    if not isinstance(jobs, list):
        return None
    return any(
        isinstance(job, dict) and job.get("endpoint") == endpoint and job.get("id") == id_
        for job in jobs
    )


def model_queues(record: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    for model in record.get("models") or []:
        if isinstance(model, dict) and isinstance(model.get("queues"), list):
            found.update(str(queue) for queue in model["queues"])
    return found


def listing(record: dict[str, Any]) -> dict[str, Any]:
    """What `GET /` shows of a worker host (its record, as the worker wrote it, trimmed)."""
    jobs = record.get("jobs") if isinstance(record.get("jobs"), list) else []
    models = record.get("models") if isinstance(record.get("models"), list) else []
    return {
        "id": record.get("id"),
        "host": record.get("host"),
        "pid": record.get("pid"),
        "state": record.get("state"),
        "jobs": [
            {"endpoint": job.get("endpoint"), "id": job.get("id")}
            for job in jobs
            if isinstance(job, dict)
        ],
        "models": [
            {key: model.get(key) for key in ("model", "name", "sha256")}
            for model in models
            if isinstance(model, dict)
        ],
        "served": record.get("served"),
        "concurrency": record.get("concurrency"),
        "runner": record.get("runner"),
        "last_heartbeat": record.get("heartbeat"),
    }
