"""The Dramatiq actor's body, in a Dramatiq worker thread: a message checked (intake.py),
started through the fence, handed to the event loop's LocalJobs, and sent again at once when
this host stopped it (so it is neither lost nor left waiting for the heartbeat timeout).

The actor returns (and Dramatiq acknowledges the message) only once the delivery is settled
in Redis: a START that Redis cannot take is tried again with backoff until it can, and a run
whose report Redis cannot take waits here until it is sent (sink.py). A message is never
acknowledged into oblivion because Redis was away for a while."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from sd_rest.cluster import entries, keys
from sd_rest.cluster.fence import ADDED, Fence, Start
from sd_rest.cluster.message import JobMessage
from sd_rest.endpoints import ENDPOINTS
from sd_rest.workerhost.intake import Refused, take
from sd_rest.workerhost.localjobs import Delivery, LocalJobs
from sd_rest.workerhost.models import HeldModel, checkpoint_for

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

RETRY_FIRST: Final = 0.2  # seconds before trying START again, doubled up to RETRY_MOST
RETRY_MOST: Final = 2.0


class Deliveries:
    def __init__(
        self,
        fence: Fence,
        client: redis.Redis,
        jobs: LocalJobs,
        loop: asyncio.AbstractEventLoop,
        models: list[HeldModel],
        ref: entries.WorkerRef,
        send_again: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self.fence = fence
        self.client = client
        self.jobs = jobs
        self.loop = loop
        self.models = models
        self.ref = ref
        self.send_again = send_again  # (queue, payload): enqueue the job's message again
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.served = 0  # deliveries this host ran to an end

    def handle(self, payload: Any) -> None:
        """The actor: never raises (a failure is the job's end entry, or logged)."""
        taken = take(payload)
        if taken is None:
            log.error("dropped a message that names no job: %.200r", payload)
            return
        if self.stopping.is_set() and isinstance(taken, JobMessage):
            self._send_again(taken)  # taken while stopping: another host runs it
            return
        attempt = secrets.token_hex(8)
        endpoint, job_id = taken.endpoint, taken.id
        start = self._start(endpoint, job_id, attempt)
        if start.verdict != "run":
            log.info("job %s/%s: not run (%s)", endpoint, job_id, start.verdict)
            return
        if isinstance(taken, Refused):
            self._fail(endpoint, job_id, attempt, taken.error)
            return
        model = ENDPOINTS[endpoint].model
        checkpoint = checkpoint_for(self.models, model, taken.checkpoint)
        if checkpoint is None:  # routing sent it here: only a hand-made message can
            self._fail(
                endpoint, job_id, attempt,
                f"this worker does not hold the checkpoint {taken.checkpoint.name}",
            )  # fmt: skip
            return
        log.info("job %s/%s: delivery %d, from image %d", endpoint, job_id, start.delivery,
                 start.made + 1)  # fmt: skip
        delivery = Delivery(taken, checkpoint, attempt, start.made, start.delivery)
        future = asyncio.run_coroutine_threadsafe(self.jobs.run(delivery), self.loop)
        outcome = future.result()
        with self._lock:
            self.served += 1
        if outcome is not None and outcome.value == "stopped":
            self._send_again(taken)

    def _start(self, endpoint: str, job_id: str, attempt: str) -> Start:
        """START's answer, however long Redis takes to give it. A host stopping meanwhile
        waits too, as long as its stop allows: Redis back, the run is stopped at once and
        its message sent again; the process gone first, the message was never acknowledged
        and Dramatiq delivers it again."""
        from redis.exceptions import ConnectionError, TimeoutError

        delay, away = RETRY_FIRST, False
        while True:
            try:
                if away:  # did the START whose answer was lost go through?
                    taken = self._started_before(endpoint, job_id, attempt)
                    if taken is not None:
                        return taken
                start = self.fence.start(endpoint, job_id, attempt, self.ref)
            except (ConnectionError, TimeoutError, OSError) as exc:
                if not away:
                    log.warning("job %s/%s: Redis cannot be reached to start it (%s): "
                                "trying again until it answers", endpoint, job_id, exc)  # fmt: skip
                away = True
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MOST)
                continue
            if away:
                log.info("job %s/%s: Redis answers again", endpoint, job_id)
            return start

    def _started_before(self, endpoint: str, job_id: str, attempt: str) -> Start | None:
        """("run", made, deliveries) when the job's hash already names `attempt` (a START
        that ran but whose answer never came back): not started twice, nor counted as a
        death of this very host."""
        current, made, deliveries = self.client.hmget(
            keys.job(endpoint, job_id), ["attempt", "made", "deliveries"]
        )
        if current is None or current.decode() != attempt:
            return None
        return Start("run", int(made or 0), int(deliveries or 0))

    def _fail(self, endpoint: str, job_id: str, attempt: str, error: str) -> None:
        log.warning("job %s/%s: %s", endpoint, job_id, error)
        fields = entries.end(attempt, "failed", error, b"")
        if self.fence.add(endpoint, job_id, attempt, fields) != ADDED:
            log.info("job %s/%s: its failure was not added (superseded)", endpoint, job_id)

    def _send_again(self, message: JobMessage) -> None:
        queue = keys.queue_for(message.checkpoint.name, message.checkpoint.sha256)
        self.send_again(queue, message.to_json())
        log.info("job %s/%s: sent back to %s", message.endpoint, message.id, queue)
