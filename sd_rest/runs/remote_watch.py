"""A remote run watched at each refresh of the worker hosts (RemoteJobs' loop): why a queued
job waits; a started job whose worker host is gone, or alive but no longer running it, for
longer than the heartbeat timeout waits in the queue again (remote_runner.py's RemoteRunner
is the one subclass: split off to keep it small)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sd_rest.cluster import keys
from sd_rest.cluster.connection import FAILURES, NodeRedis
from sd_rest.cluster.message import Checkpoint, JobMessage
from sd_rest.cluster.registry import runs as registry_runs
from sd_rest.endpoints import ENDPOINTS
from sd_rest.runs.remote_entries import RemoteEntries
from sd_rest.runs.remote_files import InputsUnreadable
from sd_rest.runs.remote_jobs import RemoteJobs
from sd_rest.runs.seam import Outcome, RunSink
from sd_rest.state.jobs import Job, Status

log = logging.getLogger(__name__)


class WatchedRun:
    remote: RemoteJobs
    redis: NodeRedis
    job: Job
    sink: RunSink
    entries: RemoteEntries
    _key: tuple[str, str]
    _checkpoint: Checkpoint | None
    _missing_since: float | None
    _unlisted_since: float | None
    _enqueueing: asyncio.Lock

    def _settle(self, outcome: Outcome) -> None:
        raise NotImplementedError

    def _queue(self) -> str:
        raise NotImplementedError

    async def _message(self) -> JobMessage:
        raise NotImplementedError

    async def refresh(self) -> None:
        """The worker hosts were read again (RemoteJobs' loop): why a queued job waits; a
        started job whose worker host has been gone longer than the heartbeat timeout waits
        in the queue again (its message is delivered again when a host can take it)."""
        model, checkpoint = ENDPOINTS[self.job.endpoint].model, self._checkpoint
        if self.job.status is Status.QUEUED and checkpoint is not None:
            self.job.set_waiting(self.remote.waiting(model, checkpoint))
            return
        registry, worker = self.remote.node.registry, self.entries.worker
        if self.job.status is not Status.IN_PROGRESS or worker is None or not registry.reachable:
            self._missing_since = self._unlisted_since = None
            return
        now = time.monotonic()
        record = registry.record(worker.id, worker.host, worker.pid)
        if record is not None:
            self._missing_since = None
            await self._check_listed(record, now)
            return
        self._unlisted_since = None
        if self._missing_since is None:
            self._missing_since = now
        elif now - self._missing_since > self.remote.node.heartbeat_timeout:
            log.warning("job %s/%s: its worker host %s is gone", *self._key, worker.host)
            self._missing_since = None
            async with self.entries.lock:
                await self.sink.requeued()
            if checkpoint is not None:
                self.job.set_waiting(self.remote.waiting(model, checkpoint))

    async def _check_listed(self, record: dict[str, Any], now: float) -> None:
        """The safety net for a job its live host no longer runs (its message acknowledged
        without an end the node took: Redis restored from an older snapshot, an error the
        host could not report): unlisted longer than the heartbeat timeout, it waits in the
        queue again and its message is sent again (the next START supersedes the old
        attempt; the images kept here are not made again)."""
        if registry_runs(record, *self._key) is not False:
            self._unlisted_since = None
            return
        if self._unlisted_since is None:
            self._unlisted_since = now
            return
        if now - self._unlisted_since <= self.remote.node.heartbeat_timeout:
            return
        self._unlisted_since = None
        log.warning(
            "job %s/%s: its worker host %s no longer runs it; sent again",
            *self._key, record.get("host"),
        )  # fmt: skip
        async with self.entries.lock:
            if self.job.status is not Status.IN_PROGRESS:
                return
            await self.sink.requeued()
        try:
            async with self._enqueueing:
                state = await self.redis.job(*self._key)
                if state is not None:
                    # Unsent until Dramatiq has it: a send Redis refuses is made by redis_back.
                    await self.redis.redis.hset(keys.job(*self._key), "enqueued", 0)
                    await self.redis.send(
                        state.get("queue") or self._queue(), await self._message()
                    )
        except InputsUnreadable as exc:
            self._settle(Outcome.failed(str(exc)))
        except FAILURES as exc:  # Redis went away: redis_back finds it when it returns
            log.warning("job %s/%s could not be sent again: %s", *self._key, exc)
