"""What a local run reports, turned into fenced entries of the job's stream (the RunSink of
runs/seam.py, on the worker host's event loop).

- started: nothing to add: START added the attempt's `started` entry;
- progress: coalesced (a fast tqdm must not flood Redis): at most one entry per
  `PROGRESS_EVERY`, but the last value of each image always goes, before the next image's;
- published: the image's bytes, read from the scratch job folder where the publisher put
  them (labelled), with its number, seed and position; pending progress goes first;
- the end: outcome, error and the log's tail.
The fence answers each add: superseded (another attempt is current) stops the run and adds
nothing more; canceled stops the run, and only its end is added.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from sd_rest.cluster import entries
from sd_rest.cluster.fence import ADDED, CANCELED, SUPERSEDED, AsyncFence
from sd_rest.runs.seam import Runner
from sd_rest.state.jobs import ImageRecord, Job
from sd_rest.state.layout import Layout

log = logging.getLogger(__name__)

PROGRESS_EVERY: Final = 0.1  # seconds between two progress entries, at least (but see above)
RETRY_FIRST: Final = 0.2  # seconds before retrying an add Redis did not take, then doubled
RETRY_MOST: Final = 2.0


class FencedSink:
    def __init__(
        self, fence: AsyncFence, job: Job, attempt: str, layout: Layout, patience: float
    ) -> None:
        self.fence = fence
        self.job = job
        self.attempt = attempt
        self.layout = layout
        self.patience = patience  # seconds an add may wait for Redis before the run is stopped
        self.runner: Runner | None = None  # set once the runner is made
        self.superseded = False  # another attempt is current: add nothing more
        self.canceled = False  # the job was canceled: only the end goes
        self.broken: str | None = None  # Redis did not take an add within `patience`
        self.ended = False  # the end is sent: output that comes after it is not reported
        self._lock = asyncio.Lock()  # one add at a time: the stream's order is the calls'
        self._pending: tuple[int, float] | None = None
        self._last_sent = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[int]] = set()

    # --- RunSink ----------------------------------------------------------------------

    async def started(self, pid: int | None) -> None:
        return None  # START added this attempt's `started` entry

    def progress(self, index: int, fraction: float) -> None:
        if self._closed:
            return
        if self._pending is not None and self._pending[0] != index:
            self._send(self._pending)  # the previous image's last value goes first
            self._pending = None
        self._pending = (index, fraction)
        wait = PROGRESS_EVERY - (time.monotonic() - self._last_sent)
        if wait <= 0:
            self._send_pending()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait, self._send_pending)

    async def published(self, record: ImageRecord) -> None:
        await self._drain()
        if self._closed:
            return
        path = self.layout.image(self.job.endpoint, self.job.id, record.n)
        loop = asyncio.get_running_loop()
        png = await loop.run_in_executor(None, path.read_bytes)
        fields = entries.image(self.attempt, record.n, record.seed, record.position, png)
        if await self._add(fields) == ADDED:
            self.job.images = (*self.job.images, record)
            await loop.run_in_executor(None, lambda: path.unlink(missing_ok=True))

    # --- the end ----------------------------------------------------------------------

    async def end(self, outcome: entries.Outcome, error: str | None, log_tail: bytes) -> int:
        """Add the run's end (after any progress still pending); the fence's answer."""
        self.ended = True
        await self._drain()
        if self.superseded or self.broken:
            return SUPERSEDED
        return await self._add(entries.end(self.attempt, outcome, error, log_tail))

    # --- sending ----------------------------------------------------------------------

    @property
    def _closed(self) -> bool:
        return self.superseded or self.canceled or self.ended or self.broken is not None

    def _send_pending(self) -> None:
        self._timer = None
        if self._pending is not None and not (self.superseded or self.canceled or self.broken):
            value, self._pending = self._pending, None
            self._send(value)

    def _send(self, value: tuple[int, float]) -> None:
        self._last_sent = time.monotonic()
        task = asyncio.create_task(self._add(entries.progress(self.attempt, *value)))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _drain(self) -> None:
        """Everything of the progress sent, in order, before what comes next."""
        if self._timer is not None:
            self._timer.cancel()
        self._send_pending()
        if self._sending:
            await asyncio.gather(*list(self._sending))

    async def _add(self, fields: entries.Fields) -> int:
        is_end = fields["kind"] == entries.END
        async with self._lock:
            if self.superseded or self.broken or (self.canceled and not is_end):
                return SUPERSEDED
            answer = await self._add_patiently(fields)
        if answer == SUPERSEDED and not self.broken:
            log.info("job %s/%s: attempt %s was superseded: stopping it",
                     self.job.endpoint, self.job.id, self.attempt)  # fmt: skip
            self.superseded = True
            self._stop_run()
        elif answer == CANCELED and not self.canceled:
            self.canceled = True
            self._stop_run()
        return answer

    async def _add_patiently(self, fields: entries.Fields) -> int:
        """The fence's answer; Redis unreachable is retried for `patience` seconds, then the
        run is stopped (its message is delivered again once this host's heartbeat stops)."""
        from redis.exceptions import RedisError

        deadline = time.monotonic() + self.patience
        delay = RETRY_FIRST
        while True:
            try:
                return await self.fence.add(self.job.endpoint, self.job.id, self.attempt, fields)
            except (RedisError, OSError) as exc:
                if time.monotonic() + delay > deadline:
                    self.broken = f"Redis did not take the job's report: {exc}"
                    log.error("job %s/%s: %s; stopping its run",
                              self.job.endpoint, self.job.id, self.broken)  # fmt: skip
                    self._stop_run()
                    return SUPERSEDED
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MOST)

    def _stop_run(self) -> None:
        if self.runner is not None:
            self.runner.cancel()
