"""States the disk refused (full, failing): visible in memory already, retried in the
background until written, so memory and sidecar disagree no longer than the fault lasts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from sd_rest.state.jobs import Job
from sd_rest.state.layout import Key

log = logging.getLogger(__name__)

SYNC_RETRY_SECONDS = 1.0


class UnsyncedStates:
    def __init__(self, write_state: Callable[[Job], None]) -> None:
        self._write_state = write_state  # blocking: run in the executor
        self._jobs: dict[Key, Job] = {}
        self._syncer: asyncio.Task[None] | None = None

    def keep(self, job: Job, exc: OSError, start_syncing: bool = True) -> None:
        """`job`'s state could not be written (`exc`): retry it until it is."""
        log.warning(
            "could not write the state of job %s/%s (%s): it is kept in memory and written "
            "as soon as the disk allows",
            job.endpoint,
            job.id,
            exc.strerror or exc,
        )
        self._jobs[(job.endpoint, job.id)] = job
        if start_syncing:
            self.start_syncing()

    def written(self, job: Job) -> None:
        """`job`'s whole state has been written: nothing of it is left to retry."""
        self._jobs.pop((job.endpoint, job.id), None)

    def __len__(self) -> int:
        return len(self._jobs)

    def start_syncing(self) -> None:
        """Retry unwritten states in the background (needs a running loop)."""
        if self._jobs and (self._syncer is None or self._syncer.done()):
            self._syncer = asyncio.get_running_loop().create_task(self._sync_until_written())

    async def _sync_until_written(self) -> None:
        while await self.sync():
            await asyncio.sleep(SYNC_RETRY_SECONDS)

    async def sync(self) -> int:
        """Write every state the disk refused so far; returns how many are still unwritten."""
        loop = asyncio.get_running_loop()
        for key, job in list(self._jobs.items()):
            async with job.lock:
                if self._jobs.get(key) is not job:
                    continue  # a commit has written it meanwhile
                try:
                    await loop.run_in_executor(None, self._write_state, job)
                except OSError:
                    continue
                del self._jobs[key]
                log.info("wrote the state of job %s/%s at last", job.endpoint, job.id)
        return len(self._jobs)

    async def close(self) -> None:
        """Stop retrying in the background; one last attempt to write what is unwritten."""
        if self._syncer is not None:
            self._syncer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._syncer
        if await self.sync():
            log.warning(
                "%d job state(s) could not be written: the next start resumes those jobs",
                len(self._jobs),
            )
