"""The worker host's event loop side: each delivered job run by the ordinary local runners on
a scratch JobStore, reporting through a FencedSink, and the cancels and the stop that reach
those runs. Runs only on the loop (the Dramatiq threads hand jobs over with
`asyncio.run_coroutine_threadsafe`).

The local Job carries placeholder records for the images the API node has already received
(1..made): the resume plan (scripts.plan_run) and the numbering of the new images follow
from them exactly as on a restarted server.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sd_rest.cluster import entries, keys
from sd_rest.cluster.fence import ADDED, AsyncFence
from sd_rest.cluster.message import JobMessage
from sd_rest.endpoints import ENDPOINTS
from sd_rest.runs.runners import Runners
from sd_rest.runs.seam import Outcome, OutcomeKind, Runner
from sd_rest.state.jobs import ImageRecord, Job, Status
from sd_rest.state.layout import Key
from sd_rest.state.store import JobStore
from sd_rest.workerhost.sink import FencedSink

if TYPE_CHECKING:
    import redis.asyncio

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """One delivery of a job to this host, after START let it run."""

    message: JobMessage
    checkpoint: Path  # the local file it runs with
    attempt: str
    made: int  # images the stream already has
    delivery: int


class LocalJobs:
    def __init__(
        self,
        runners: Runners,
        store: JobStore,
        client: redis.asyncio.Redis,
    ) -> None:
        self.runners = runners
        self.store = store
        self.client = client
        self.fence = AsyncFence(client)
        self.running: dict[Key, Runner] = {}
        self.stopping = False

    async def run(self, delivery: Delivery) -> OutcomeKind | None:
        """Run one delivery to its end entry; the outcome added (None: nothing was, the
        attempt being superseded or the job's hash gone). While Redis is unreachable this
        waits, the run's report kept (sink.py): the delivery is only over once it is sent."""
        message = delivery.message
        job = _local_job(delivery)
        if len(job.images) >= job.total_images:  # everything made before: just say so
            return await self._end(job, delivery, Outcome(OutcomeKind.COMPLETE), None)
        key = (job.endpoint, job.id)
        loop = asyncio.get_running_loop()
        sink = FencedSink(self.fence, job, delivery.attempt, self.store.layout)
        try:
            # Started: whatever fails from here on (this host's disk full...) is the job's
            # end, never a job left looking as if it ran.
            await loop.run_in_executor(None, self._clear, job)
            await self.store.restore_inputs(job, message.inputs)
            runner = sink.runner = self.runners(job, sink)
            self.running[key] = runner
            # A cancel published between START and now reached nobody: ask the hash once.
            if await self._canceled(key):
                runner.cancel()
            if self.stopping:
                runner.stop(self.runners.settings.shutdown_grace)
            outcome = await runner.run()
        except Exception:
            incident = secrets.token_hex(8)
            log.exception("job %s/%s failed inside the worker host (%s)", *key, incident)
            outcome = Outcome.failed(
                f"internal error on the worker host while running the job; logged as {incident}"
            )
        finally:
            self.running.pop(key, None)
        return await self._end(job, delivery, outcome, sink)

    async def _end(
        self, job: Job, delivery: Delivery, outcome: Outcome, sink: FencedSink | None
    ) -> OutcomeKind | None:
        loop = asyncio.get_running_loop()
        tail = await loop.run_in_executor(None, self._log_tail, job)
        if sink is None:
            sink = FencedSink(self.fence, job, delivery.attempt, self.store.layout)
        answer = await sink.end(outcome.kind.value, outcome.error, tail)  # type: ignore[arg-type]
        await loop.run_in_executor(None, self._clear, job)
        if answer != ADDED:
            return None
        # The sink ends the attempt `stopped` when Redis's `made` fell behind (sink.py).
        kind = OutcomeKind.STOPPED if sink.resend else outcome.kind
        log.info("job %s/%s: %s", job.endpoint, job.id, kind.value)
        return kind

    async def _canceled(self, key: Key) -> bool:
        from redis.exceptions import ConnectionError, TimeoutError

        try:
            return await self.client.hget(keys.job(*key), "canceled") == b"1"
        except (ConnectionError, TimeoutError, OSError):
            return False  # Redis away: the run's first report through the fence will tell

    def cancel(self, endpoint: str, job_id: str) -> None:
        runner = self.running.get((endpoint, job_id))
        if runner is not None:
            log.info("job %s/%s: canceled by the API node", endpoint, job_id)
            runner.cancel()

    def stop_all(self) -> None:
        """The host is stopping: every run is interrupted (STOPPED), and none starts."""
        self.stopping = True
        for runner in list(self.running.values()):
            runner.stop(self.runners.settings.shutdown_grace)

    def describe(self) -> list[dict[str, str]]:
        return [{"endpoint": endpoint, "id": id_} for endpoint, id_ in list(self.running)]

    def _clear(self, job: Job) -> None:
        shutil.rmtree(self.store.layout.job_dir(job.endpoint, job.id), ignore_errors=True)

    def _log_tail(self, job: Job) -> bytes:
        path = self.store.layout.log(job.endpoint, job.id)
        try:
            with open(path, "rb") as file:
                size = file.seek(0, 2)
                file.seek(max(0, size - entries.LOG_TAIL_BYTES))
                return file.read()
        except OSError:
            return b""


def _local_job(delivery: Delivery) -> Job:
    message = delivery.message
    endpoint = ENDPOINTS[message.endpoint]
    total = endpoint.total_images(message.params)
    made = min(delivery.made, total)
    return Job(
        id=message.id,
        endpoint=message.endpoint,
        params=message.params,
        checkpoint=str(delivery.checkpoint),
        uploads=dict(message.uploads),
        inputs={field: endpoint.input_names()[field] for field in message.inputs},
        seq=0,
        status=Status.IN_PROGRESS,
        # Placeholders: only their count matters here (the API node keeps the real ones).
        images=tuple(ImageRecord(n, 0, 0, "") for n in range(1, made + 1)),
        attempts=max(delivery.delivery - 1, 0),
    )
