"""A running worker host: the Dramatiq worker consuming the queues of the checkpoints it holds,
one asyncio loop thread hosting the local runners on a scratch JobStore, the cancel listener
and the registry's heartbeat; and the graceful stop on SIGTERM or SIGINT.

The stop (a second signal exits at once: stopping.py): no message is taken any more, every
run is interrupted (runner.stop), each adds `end stopped` through the fence and sends its
message again at once (another host, or this one restarted, resumes it from the images
already made), the registry record is deleted, the scratch folder cleared; exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from dataclasses import dataclass
from typing import Any

from sd_rest.cluster import entries, keys
from sd_rest.cluster.broker import make_broker
from sd_rest.cluster.fence import Fence
from sd_rest.runs.runners import Runners
from sd_rest.settings import Settings
from sd_rest.state.events import JobEvents
from sd_rest.state.layout import Layout
from sd_rest.state.store import JobStore
from sd_rest.workerhost import capacity, heartbeat
from sd_rest.workerhost.cancels import CancelListener
from sd_rest.workerhost.deliveries import Deliveries
from sd_rest.workerhost.localjobs import LocalJobs
from sd_rest.workerhost.models import HeldModel, queues_of

log = logging.getLogger(__name__)

STOP_EXTRA = 20.0  # seconds beyond the runs' grace for the last entries and re-sends
# The longest an idle consumer waits between two fetches (Dramatiq backs off up to it after
# each empty one; its default, 1 s, would be part of a job's POST → started after a quiet
# spell), and the longest a full host's fetch waits for a slot (capacity.py). 100 gave a
# POST → started p95 of 104 ms in bench cluster; 50 costs an idle host ~20 fetches a second
# per queue.
WORKER_TIMEOUT_MS = 50


@dataclass(frozen=True)
class HostConfig:
    broker_url: str
    heartbeat_timeout: float
    settings: Settings  # output: this process's scratch folder
    models: list[HeldModel]
    ref: entries.WorkerRef


class WorkerHost:
    def __init__(self, config: HostConfig) -> None:
        import dramatiq
        import redis

        self.config = config
        settings = config.settings
        # What may fail comes first, before any thread or process is started.
        self.broker = make_broker(config.broker_url, config.heartbeat_timeout)
        queues = queues_of(config.models)
        for queue in queues:
            self.broker.declare_queue(queue)
        dramatiq.actor(
            self._handle, actor_name=keys.ACTOR, broker=self.broker, queue_name=queues[0]
        )
        self.worker = dramatiq.Worker(
            self.broker, queues=set(queues), worker_threads=settings.concurrency,
            worker_timeout=WORKER_TIMEOUT_MS,
        )  # fmt: skip
        # Fetch no more than it runs, over all its queues together (capacity.py): a message
        # waiting here is one another host could run.
        self.worker.queue_prefetch = settings.concurrency
        capacity.gate(self.broker, capacity.Slots(settings.concurrency))
        self.client = redis.Redis.from_url(config.broker_url)
        self.loop = asyncio.new_event_loop()
        # A daemon: a start that fails later must not leave the process waiting on it.
        self._loop_thread = threading.Thread(
            target=self.loop.run_forever, name="runs", daemon=True
        )
        self.store = JobStore(Layout(settings.output), JobEvents())
        self.runners = Runners(settings, self.store)
        self.jobs = self._on_loop(self._make_jobs())
        self.deliveries = Deliveries(
            Fence(self.client), self.client, self.jobs, self.loop, config.models, config.ref,
            self.broker.enqueue,
        )  # fmt: skip
        self.cancels = CancelListener(self.client, self._cancel)
        self.heartbeat = heartbeat.Heartbeat(
            self.client, config.ref.worker_id, config.heartbeat_timeout, self.describe,
            self.broker.broker_id,
        )

    def _on_loop(self, coroutine: Any) -> Any:
        if not self._loop_thread.is_alive():
            self._loop_thread.start()
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def _make_jobs(self) -> LocalJobs:
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(self.config.broker_url)
        self.runners.start()  # a resident worker warms up before the first job
        return LocalJobs(self.runners, self.store, client)

    # --- running ----------------------------------------------------------------------

    def run(self, requested: threading.Event) -> None:
        """Serve until `requested` (SIGTERM or SIGINT: stopping.py), then stop gracefully
        (see the module's docstring). Requested while the host was made: no job is taken."""
        if not requested.is_set():
            self.heartbeat.start()
            self.cancels.start()
            self.worker.start()
            ref, settings = self.config.ref, self.config.settings
            log.info(
                "worker %s (pid %d) taking jobs from %s: %s; runner %s, concurrency %d",
                ref.worker_id, ref.pid, ", ".join(queues_of(self.config.models)),
                ", ".join(f"{m.model.value} {m.name}" for m in self.config.models),
                settings.runner, settings.concurrency,
            )  # fmt: skip
            while not requested.wait(1.0):
                pass
        self.stop()

    def stop(self) -> None:
        log.info("stopping: the running jobs go back to the queue")
        self.deliveries.stopping.set()
        self.loop.call_soon_threadsafe(self.jobs.stop_all)
        grace = self.config.settings.shutdown_grace
        self.worker.stop(timeout=int((grace + STOP_EXTRA) * 1000))
        self.cancels.stop()
        self.heartbeat.stop()
        self._on_loop(self._close_loop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join()
        self.broker.close()
        self.client.close()
        shutil.rmtree(self.config.settings.output, ignore_errors=True)
        log.info("stopped")

    async def _close_loop(self) -> None:
        await self.runners.close()
        await self.jobs.client.aclose()

    # --- what the threads ask -----------------------------------------------------------

    def _handle(self, payload: Any) -> None:
        """The Dramatiq actor (a worker thread)."""
        try:
            self.deliveries.handle(payload)
        except Exception:
            # A bug outside a started job (Redis failing is waited out below, a failure after
            # START ends the job failed): logged; the message is acknowledged (a delivery
            # that failed here would fail again).
            log.exception("a delivery failed on this worker host")

    def _cancel(self, endpoint: str, job_id: str) -> None:
        self.loop.call_soon_threadsafe(self.jobs.cancel, endpoint, job_id)

    def describe(self) -> dict[str, Any]:
        """The registry record (heartbeat.record); read from the heartbeat's thread."""
        ref, settings = self.config.ref, self.config.settings
        return heartbeat.record(
            ref.worker_id, ref.host, ref.pid, self.jobs.describe(),
            [model.describe() for model in self.config.models], self.deliveries.served,
            settings.concurrency, settings.runner,
        )  # fmt: skip
