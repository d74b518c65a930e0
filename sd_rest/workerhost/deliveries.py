"""The Dramatiq actor's body, in a Dramatiq worker thread: a message checked (intake.py),
started through the fence, handed to the event loop's LocalJobs, and sent again at once when
this host stopped it (so it is neither lost nor left waiting for the heartbeat timeout).

The actor returns (and Dramatiq acknowledges the message) only once the delivery is settled
in Redis: a START, a failure's end or a message sent again that Redis cannot take (away, or
refusing writes: out of memory, a snapshot it cannot write, a read-only replica) is tried
again with backoff until it can, and a run whose report Redis cannot take waits here until it
is sent (sink.py). A message is never acknowledged into oblivion because Redis was away or
full for a while; and anything that goes wrong once START let the job run ends it `failed`
through the fence, never with the job left to look as if it were running."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sd_rest.cluster import entries, keys
from sd_rest.cluster.fence import ADDED, Fence, Start
from sd_rest.cluster.message import JobMessage, dramatiq_message, redis_id
from sd_rest.endpoints import ENDPOINTS
from sd_rest.workerhost.intake import Refused, take
from sd_rest.workerhost.localjobs import Delivery, LocalJobs
from sd_rest.workerhost.models import HeldModel, checkpoint_for

if TYPE_CHECKING:
    import dramatiq
    import redis

log = logging.getLogger(__name__)

RETRY_FIRST: Final = 0.2  # seconds before trying START again, doubled up to RETRY_MOST
RETRY_MOST: Final = 2.0

T = TypeVar("T")


class Deliveries:
    def __init__(
        self,
        fence: Fence,
        client: redis.Redis,
        jobs: LocalJobs,
        loop: asyncio.AbstractEventLoop,
        models: list[HeldModel],
        ref: entries.WorkerRef,
        enqueue: Callable[[dramatiq.Message[Any]], dramatiq.Message[Any]],
    ) -> None:
        self.fence = fence
        self.client = client
        self.jobs = jobs
        self.loop = loop
        self.models = models
        self.ref = ref
        self.enqueue = enqueue  # the broker's: a job's message sent again
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
        try:
            self._run(taken, attempt, start)
        except Exception:
            # A bug, or this host's disk: the job must not stay started with nobody on it.
            incident = secrets.token_hex(8)
            log.exception("job %s/%s failed on this worker host (%s)", endpoint, job_id, incident)
            self._fail(endpoint, job_id, attempt,
                       f"internal error on the worker host; logged as {incident}")  # fmt: skip

    def _run(self, taken: JobMessage | Refused, attempt: str, start: Start) -> None:
        endpoint, job_id = taken.endpoint, taken.id
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
        tried = False

        def start() -> Start:
            nonlocal tried
            if tried:  # did a START whose answer was lost go through?
                taken = self._started_before(endpoint, job_id, attempt)
                if taken is not None:
                    return taken
            tried = True
            return self.fence.start(endpoint, job_id, attempt, self.ref)

        return self._patiently(f"job {endpoint}/{job_id}: start it", start)

    def _patiently(self, what: str, call: Callable[[], T]) -> T:
        """`call()`'s result, tried again with backoff for as long as Redis fails it: away,
        or answering with an error (out of memory, MISCONF, READONLY...). Said once."""
        from redis.exceptions import RedisError

        delay, failing = RETRY_FIRST, False
        while True:
            try:
                result = call()
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("%s: Redis failed it (%s): trying again until it answers",
                                what, exc)  # fmt: skip
                failing = True
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MOST)
                continue
            if failing:
                log.info("%s: Redis answers again", what)
            return result

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
        answer = self._patiently(
            f"job {endpoint}/{job_id}: end it failed",
            lambda: self.fence.add(endpoint, job_id, attempt, fields),
        )
        if answer != ADDED:
            log.info("job %s/%s: its failure was not added (superseded)", endpoint, job_id)

    def _send_again(self, message: JobMessage) -> None:
        """The job's message on its queue again, and named in its hash (a cancel takes it
        back from there); however long Redis takes to take them."""
        queue = keys.queue_for(message.checkpoint.name, message.checkpoint.sha256)
        what = f"job {message.endpoint}/{message.id}: send it again"
        sent = self._patiently(what, lambda: self.enqueue(dramatiq_message(queue, message)))
        self._patiently(what, lambda: self.fence.resent(message.endpoint, message.id,
                                                        redis_id(sent)))  # fmt: skip
        log.info("job %s/%s: sent back to %s", message.endpoint, message.id, queue)
