"""What every remote run of an API node shares (--broker): the cluster node (Redis, the
stream reader, the live worker hosts), each job's checkpoint as the queues name it, why a job
waits, and what `GET /` shows of the worker hosts. The runs themselves: remote_runner.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sd_rest.cluster import keys
from sd_rest.cluster.message import Checkpoint
from sd_rest.cluster.node import ClusterNode
from sd_rest.cluster.registry import listing
from sd_rest.endpoints import ENDPOINTS
from sd_rest.runs.provenance import Provenance, provenance_for
from sd_rest.settings import Model, Settings


class RemoteJobs:
    def __init__(self, settings: Settings) -> None:
        assert settings.broker is not None
        self.settings = settings
        self.node = ClusterNode(settings.broker, settings.heartbeat_timeout)
        self.provenance: Provenance = provenance_for(settings.output, settings.repository)

    def start(self) -> None:
        self.node.start()

    async def close(self) -> None:
        await self.node.close()

    async def unavailable(self) -> str | None:
        """Why a job cannot be handed to the worker hosts now (Redis does not answer)."""
        return await self.node.redis.unavailable()

    async def checkpoint(self, path: Path) -> Checkpoint:
        """The checkpoint a job needs, as its queue names it: by SHA-256 when this node has
        the file (hashed once, cached), else by its file name."""
        digest = await asyncio.to_thread(self.provenance.sha256_now, path)
        return Checkpoint(path.name, digest)

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
