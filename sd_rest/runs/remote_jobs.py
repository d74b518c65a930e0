"""What every remote run of an API node shares (--broker): the cluster node (Redis, the
stream reader, the live worker hosts), each job's checkpoint as the queues name it, why a job
waits (one loop for every job, at each refresh of the worker hosts), and what `GET /` shows
of the worker hosts. The runs themselves: remote_runner.py."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Final, Protocol

from sd_rest.cluster import keys
from sd_rest.cluster.connection import UNREACHABLE
from sd_rest.cluster.message import Checkpoint
from sd_rest.cluster.node import ClusterNode
from sd_rest.cluster.registry import listing
from sd_rest.endpoints import ENDPOINTS
from sd_rest.runs.provenance import Provenance, provenance_for
from sd_rest.settings import Model, Settings
from sd_rest.state.layout import ID_RE, Key
from sd_rest.state.store import JobStore

log = logging.getLogger(__name__)

SWEEP_RETRY_FIRST: Final = 0.5
SWEEP_RETRY_MOST: Final = 10.0


class Watched(Protocol):
    async def refresh(self) -> None:
        """The worker hosts were read again: why the job waits, whether its worker lives."""
        ...


class RemoteJobs:
    def __init__(self, settings: Settings, store: JobStore) -> None:
        assert settings.broker is not None
        self.settings = settings
        self.store = store
        self.node = ClusterNode(settings.broker, settings.heartbeat_timeout)
        self.provenance: Provenance = provenance_for(settings.output, settings.repository)
        # One hashing per checkpoint file, every job awaiting it (never a thread per job).
        self._hashing: dict[Path, asyncio.Task[str | None]] = {}
        self.runs: dict[Key, Watched] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.node.start()
        self._watcher = asyncio.create_task(self._watch(), name="cluster-waiting")
        self._sweeper = asyncio.create_task(self._sweep(), name="cluster-sweep")

    async def close(self) -> None:
        tasks = [self._watcher, self._sweeper, *self._hashing.values()]
        for task in tasks:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
        await self.node.close()

    async def _watch(self) -> None:
        while True:
            await self.node.registry.changed()
            for run in list(self.runs.values()):
                try:
                    await run.refresh()
                except Exception:  # the loop serves every job: it goes on
                    log.exception("a remote job's waiting reason")

    async def _sweep(self) -> None:
        """Once, at start (retried while Redis cannot be reached): the keys of every job this
        node has finished or no longer has are dropped, its message taken back from its queue
        (no worker host runs it): a node that died before deleting them, deletions Redis
        refused, --delete-incomplete, a run without --broker that finished the job."""
        delay = SWEEP_RETRY_FIRST
        while True:
            try:
                dropped = await self._sweep_once()
            except UNREACHABLE:
                await asyncio.sleep(delay)
                delay = min(delay * 2, SWEEP_RETRY_MOST)
                continue
            except Exception as exc:  # a refusal (ACL, OOM...): the runs retry their own
                log.warning("the stale job keys in Redis could not be swept: %s", exc)
                return
            if dropped:
                log.info("dropped the Redis keys of %d finished or deleted job(s)", dropped)
            return

    async def _sweep_once(self) -> int:
        redis, dropped = self.node.redis, 0
        async for endpoint, id_, state in redis.job_hashes():
            if endpoint not in ENDPOINTS or not ID_RE.fullmatch(id_):
                continue  # not a name this node makes: left alone
            job = await self.store.get(endpoint, id_)
            if job is not None and not job.status.finished:
                continue  # its run follows it (and drops it if it is an earlier run's)
            if await redis.discard(endpoint, id_, state):
                dropped += 1
        return dropped

    async def unavailable(self) -> str | None:
        """Why a job cannot be handed to the worker hosts now (Redis does not answer)."""
        return await self.node.redis.unavailable()

    async def checkpoint(self, path: Path) -> Checkpoint:
        """The checkpoint a job needs, as its queue names it: by SHA-256 when this node has
        the file (hashed once, cached), else by its file name."""
        known = self.provenance.checkpoint_sha256(path)
        if known is not None:
            return Checkpoint(path.name, known)
        task = self._hashing.get(path)
        if task is None or task.done():
            task = asyncio.create_task(asyncio.to_thread(self.provenance.sha256_now, path))
            self._hashing[path] = task
        return Checkpoint(path.name, await asyncio.shield(task))

    def _known(self, path: Path) -> Checkpoint:
        """The checkpoint as far as it is known now, without waiting for its hash."""
        return Checkpoint(path.name, self.provenance.checkpoint_sha256(path))

    def waiting(self, model: Model, checkpoint: Checkpoint) -> str | None:
        """Why a job on this checkpoint waits, when no live worker host can take it."""
        registry = self.node.registry
        if not registry.reachable:
            return "the broker (Redis) cannot be reached: no worker host is known"
        if registry.serves(keys.queue_for(checkpoint.name, checkpoint.sha256)):
            return None
        digest = f" [sha256 {checkpoint.sha256}]" if checkpoint.sha256 else ""
        return f"no live worker holds the {model.value} checkpoint {checkpoint.name}{digest}"

    def workers(self) -> list[dict[str, Any]]:
        """The live worker hosts, from the cache (never waits on Redis)."""
        return [listing(record) for record in self.node.registry.records]

    def unserved(self) -> dict[str, str]:
        """Each endpoint no live worker host can serve, and why."""
        found = {}
        for name, endpoint in ENDPOINTS.items():
            path = self.settings.checkpoint(endpoint.model).resolve()
            reason = self.waiting(endpoint.model, self._known(path))
            if reason is not None:
                found[f"/{name}"] = reason
        return found
