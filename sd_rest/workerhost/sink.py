"""What a local run reports, turned into fenced entries of the job's stream (the RunSink of
runs/seam.py, on the worker host's event loop).

- started: nothing to add: START added the attempt's `started` entry;
- progress: sent at once (the scripts' tqdm redraws ten times a second at most; a client's
  progress event must not wait for a timer); while an entry is on its way, a newer value of
  the same image replaces the one waiting, so a slow Redis gets the latest, not a backlog;
- published: the image is the run's at once (it stays in the scratch job folder) and its
  entry (number, seed, position, the PNG's bytes read only when sent) goes after the pending
  progress;
- the end: outcome, error and the log's tail; `end` returns once everything is sent.

Every entry waits in an outbox that one sender task empties in order. While Redis cannot be
reached, or refuses the write (out of memory, MISCONF, READONLY), the sender keeps the entries
(the script goes on; its images stay on disk) and tries again with backoff, for as long as it
takes: nothing is dropped because Redis was away or full. When Redis takes it, the fence
decides: superseded (another attempt is current, or the job's hash is gone because Redis lost
it and the API node enqueues the job again) stops the run and drops the rest; canceled stops
the run, and only its end goes; an image out of order (Redis came back from an older snapshot,
its `made` behind this run) stops the run, and its end goes as `stopped`: the job is sent
again (deliveries.py) and resumes after Redis's `made`. An image whose scratch file cannot be
read is answered the same way (it is made again by the next delivery).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Final

from sd_rest.cluster import entries
from sd_rest.cluster.fence import ADDED, CANCELED, OUT_OF_ORDER, SUPERSEDED, AsyncFence
from sd_rest.runs.seam import Runner
from sd_rest.state.jobs import ImageRecord, Job
from sd_rest.state.layout import Layout

log = logging.getLogger(__name__)

RETRY_FIRST: Final = 0.2  # seconds before retrying an add Redis did not take, then doubled
RETRY_MOST: Final = 2.0


@dataclass
class _Entry:
    kind: str  # entries.PROGRESS, IMAGE or END
    progress: tuple[int, float] | None = None
    record: ImageRecord | None = None
    end: entries.Fields | None = None


class FencedSink:
    def __init__(self, fence: AsyncFence, job: Job, attempt: str, layout: Layout) -> None:
        self.fence = fence
        self.job = job
        self.attempt = attempt
        self.layout = layout
        self.runner: Runner | None = None  # set once the runner is made
        self.superseded = False  # another attempt is current (or the hash is gone): no more
        self.canceled = False  # the job was canceled: only the end goes
        self.ended = False  # the end is queued: output that comes after it is not reported
        # Redis's `made` is not this run's (or an image is unreadable): the run stops and its
        # end goes as `stopped`, for the job to be sent again.
        self.resend = False
        self.holding = False  # Redis is unreachable: the entries wait here
        self._outbox: deque[_Entry] = deque()
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[int] | None = None

    # --- RunSink ----------------------------------------------------------------------

    async def started(self, pid: int | None) -> None:
        return None  # START added this attempt's `started` entry

    def progress(self, index: int, fraction: float) -> None:
        if not self._closed:
            self._queue_progress((index, fraction))

    async def published(self, record: ImageRecord) -> None:
        if self._closed:
            return
        # The run's from now on (its file stays in the scratch folder until it is sent), so
        # the run ends complete even when Redis is away when it does.
        self.job.images = (*self.job.images, record)
        self._queue(_Entry(entries.IMAGE, record=record))

    # --- the end ----------------------------------------------------------------------

    async def end(self, outcome: entries.Outcome, error: str | None, log_tail: bytes) -> int:
        """Queue the run's end after everything else and wait until all is sent (however
        long Redis is away); the fence's answer to the end."""
        self.ended = True
        self._wake.set()  # a sender waiting for more sees the end (or that none comes)
        if not self.superseded:
            if self.resend:
                outcome, error = "stopped", None
            fields = entries.end(self.attempt, outcome, error, log_tail)
            self._queue(_Entry(entries.END, end=fields))
        if self._sender is None:
            return SUPERSEDED
        return await self._sender

    # --- the outbox -------------------------------------------------------------------

    @property
    def _closed(self) -> bool:
        return self.superseded or self.canceled or self.ended or self.resend

    def _queue_progress(self, value: tuple[int, float]) -> None:
        # While entries wait (Redis away), a newer value of the same image replaces the
        # last one waiting: an outage of an hour holds one progress entry, not 36,000.
        last = self._outbox[-1] if len(self._outbox) > 1 else None
        if last is not None and last.progress is not None and last.progress[0] == value[0]:
            last.progress = value
            return
        self._queue(_Entry(entries.PROGRESS, progress=value))

    def _queue(self, entry: _Entry) -> None:
        self._outbox.append(entry)
        self._wake.set()
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_all())

    async def _send_all(self) -> int:
        """Send the outbox in order until the end is sent; the end's answer."""
        while True:
            if not self._outbox:
                if self.ended:
                    return SUPERSEDED  # the end was dropped (superseded)
                self._wake.clear()
                await self._wake.wait()
                continue
            entry = self._outbox[0]
            if (self.canceled or self.resend) and entry.kind != entries.END:
                self._outbox.popleft()
                continue
            answer = await self._send_patiently(entry)
            self._outbox.popleft()
            if entry.kind == entries.IMAGE and answer == ADDED:
                await self._forget_image(entry)
            if answer == SUPERSEDED:
                self._superseded()
            elif answer == OUT_OF_ORDER:
                self._out_of_order()
            elif answer == CANCELED and not self.canceled:
                self.canceled = True
                self._stop_run()
            if entry.kind == entries.END:
                return answer

    async def _send_patiently(self, entry: _Entry) -> int:
        """The fence's answer to `entry`, however long Redis takes to answer."""
        from redis.exceptions import RedisError

        delay = RETRY_FIRST
        while True:
            fields = await self._fields(entry)
            if fields is None:
                return OUT_OF_ORDER  # the image's file is unreadable: made again elsewhere
            try:
                answer = await self.fence.add(self.job.endpoint, self.job.id, self.attempt, fields)
            except (RedisError, OSError) as exc:
                if not self.holding:
                    log.warning("job %s/%s: Redis cannot take its report (%s): it is kept "
                                "here and sent when Redis answers", self.job.endpoint,
                                self.job.id, exc)  # fmt: skip
                    self.holding = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MOST)
                continue
            if self.holding:
                log.info("job %s/%s: Redis answers again: sending what was kept",
                         self.job.endpoint, self.job.id)  # fmt: skip
                self.holding = False
            return answer

    async def _fields(self, entry: _Entry) -> entries.Fields | None:
        if entry.end is not None:
            return entry.end
        if entry.progress is not None:
            return entries.progress(self.attempt, *entry.progress)
        record = entry.record
        assert record is not None
        path = self.layout.image(self.job.endpoint, self.job.id, record.n)
        try:
            # Read when sent, not kept: a long outage holds files, not memory.
            png = await asyncio.get_running_loop().run_in_executor(None, path.read_bytes)
        except OSError as exc:
            log.error("job %s/%s: image %d could not be read to be sent (%s): the run stops "
                      "and the job goes back to the queue",
                      self.job.endpoint, self.job.id, record.n, exc)  # fmt: skip
            return None
        return entries.image(self.attempt, record.n, record.seed, record.position, png)

    async def _forget_image(self, entry: _Entry) -> None:
        assert entry.record is not None
        path = self.layout.image(self.job.endpoint, self.job.id, entry.record.n)
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: path.unlink(missing_ok=True)
        )

    def _superseded(self) -> None:
        if self.superseded:
            return
        log.info("job %s/%s: attempt %s was superseded (or the job is gone): stopping it",
                 self.job.endpoint, self.job.id, self.attempt)  # fmt: skip
        self.superseded = True
        self._outbox.clear()
        self._stop_run()

    def _out_of_order(self) -> None:
        """The run stops; its end (queued already, or to come) goes as `stopped`."""
        if self.resend:
            return
        log.warning("job %s/%s: Redis's count of its images is not this run's (Redis restarted "
                    "from an older snapshot?): the job goes back to the queue to resume there",
                    self.job.endpoint, self.job.id)  # fmt: skip
        self.resend = True
        for entry in self._outbox:
            if entry.end is not None:
                entry.end = {**entry.end, "outcome": "stopped"}
                entry.end.pop("error", None)
        self._stop_run()

    def _stop_run(self) -> None:
        if self.runner is not None:
            self.runner.cancel()
