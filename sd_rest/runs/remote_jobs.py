"""What every remote run of an API node shares (--broker): the cluster node (Redis, the
stream reader, the live worker hosts), each job's checkpoint as the queues name it, why a job
waits (one loop for every job, at each refresh of the worker hosts), and what `GET /` shows
of the worker hosts. The runs themselves: remote_runner.py."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Protocol

from sd_rest.cluster import keys
from sd_rest.cluster.message import Checkpoint
from sd_rest.cluster.node import ClusterNode
from sd_rest.cluster.registry import listing
from sd_rest.endpoints import ENDPOINTS
from sd_rest.runs.provenance import Provenance, provenance_for
from sd_rest.settings import Model, Settings
from sd_rest.state.layout import Key

log = logging.getLogger(__name__)


class Watched(Protocol):
    async def refresh(self) -> None:
        """The worker hosts were read again: why the job waits, whether its worker lives."""
        ...


class RemoteJobs:
    def __init__(self, settings: Settings) -> None:
        assert settings.broker is not None
        self.settings = settings
        self.node = ClusterNode(settings.broker, settings.heartbeat_timeout)
        self.provenance: Provenance = provenance_for(settings.output, settings.repository)
        # One hashing per checkpoint file, every job awaiting it (never a thread per job).
        self._hashing: dict[Path, asyncio.Task[str | None]] = {}
        self.runs: dict[Key, Watched] = {}
        self._watcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.node.start()
        self._watcher = asyncio.create_task(self._watch(), name="cluster-waiting")

    async def close(self) -> None:
        tasks = [self._watcher, *self._hashing.values()]
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
