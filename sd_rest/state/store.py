"""Job state, durable, behind one facade: the order of a change (written to disk, then visible
in memory, then announced) and the lookups that fall back on the disk.

Every change is a transition of lifecycle.py, written by jobfiles.py (a sidecar per job folder,
a marker per unfinished job) before it is visible in memory (jobcache.py), then put in the index
(index.py) and announced (events.py). An outcome the disk refuses is retried by unsynced.py.
Unfinished jobs stay in memory; finished ones are read the first time somebody asks for them.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
from pathlib import Path

from sd_rest.state import lifecycle
from sd_rest.state.events import JobEvents
from sd_rest.state.files import is_link_error, read_plain
from sd_rest.state.index import JobIndex
from sd_rest.state.jobcache import JobCache
from sd_rest.state.jobfiles import JobFiles
from sd_rest.state.jobs import Job
from sd_rest.state.layout import Layout
from sd_rest.state.quarantine import Quarantine
from sd_rest.state.unsynced import UnsyncedStates

# A sidecar that is there but cannot be read as a file: a damaged job, not a passing fault.
_UNREADABLE = frozenset({errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EINVAL})


class JobStore:
    def __init__(
        self,
        layout: Layout,
        events: JobEvents,
        finished_cache: int = 1024,
        index: JobIndex | None = None,
    ) -> None:
        self.layout = layout
        self.events = events
        self.index = index or JobIndex(layout)  # every job, for GET /jobs (index.py)
        # Held while a run folder is made, a leftover one removed or a folder quarantined, so
        # that the background sweep never takes the folder of a run that has just started.
        self.folders_lock = threading.Lock()
        self.quarantine = Quarantine(layout, self.folders_lock)
        self._files = JobFiles(layout)
        self._memory = JobCache(finished_cache)
        self._unsynced = UnsyncedStates(self._files.write_state)

    @property
    def output(self) -> Path:
        return self.layout.output

    # --- lookups ----------------------------------------------------------------------

    def cached(self, endpoint: str, job_id: str) -> Job | None:
        """Memory only: the status GET's fast path."""
        return self._memory.get(endpoint, job_id)

    async def get(self, endpoint: str, job_id: str) -> Job | None:
        job = self.cached(endpoint, job_id)
        if job is not None:
            return job
        loaded = await asyncio.get_running_loop().run_in_executor(
            None, self.read_job, endpoint, job_id
        )
        if loaded is None:
            return None
        # Another request may have read it meanwhile: one object per job.
        return self.cached(endpoint, job_id) or self.keep(loaded)

    def keep(self, job: Job) -> Job:
        """Hold `job` in memory: unfinished ones for good, finished ones in the bounded cache."""
        return self._memory.keep(job)

    def unfinished(self, endpoint: str, job_id: str) -> Job | None:
        """An unfinished job (they are all in memory), or None."""
        return self._memory.unfinished(endpoint, job_id)

    def unfinished_jobs(self) -> list[Job]:
        return self._memory.unfinished_jobs()

    def forget(self, endpoint: str, job_id: str) -> None:
        self._memory.drop(endpoint, job_id)
        self.index.remove(endpoint, job_id)

    def in_memory(self, endpoint: str, job_id: str) -> bool:
        return self._memory.holds(endpoint, job_id)

    def __len__(self) -> int:
        return len(self._memory)

    def read_job(self, endpoint: str, job_id: str) -> Job | None:
        """The job its sidecar describes, or None. A job or endpoint folder that is a link,
        and a sidecar that cannot be used, are moved to the quarantine (sync: call it off
        the event loop)."""
        folder = self.layout.job_dir(endpoint, job_id)
        if os.path.islink(folder.parent):
            return None  # a link is never content (recovery moves such links away)
        if os.path.islink(folder):
            self._quarantine(folder, "the job folder is a symbolic link", None)
            return None
        try:
            data = read_plain(folder / "job.json")
        except FileNotFoundError:
            return None
        except OSError as exc:
            # Other errors (too many open files, I/O) are raised, not taken for a damaged job.
            if not (is_link_error(exc) or exc.errno in _UNREADABLE):
                raise
            self._quarantine(folder, f"unreadable sidecar: {exc}", None)
            return None
        try:
            job = Job.from_sidecar(json.loads(data))
            if (job.endpoint, job.id) != (endpoint, job_id):
                raise ValueError(f"sidecar names {job.endpoint}/{job.id}")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            self._quarantine(folder, f"corrupt sidecar: {exc}", data)
            return None
        return job

    def _quarantine(self, folder: Path, reason: str, bad: bytes | None) -> None:
        if self.quarantine.move(folder, reason, bad):
            self.index.remove(folder.parent.name, folder.name)

    # --- changes: durable first, visible after ------------------------------------------

    async def add(self, job: Job, inputs: dict[str, bytes]) -> None:
        """Persist a new job with its input files; only then is it visible. Raises OSError
        (with nothing of the job left on disk) when the disk refuses it."""
        loop = asyncio.get_running_loop()
        async with job.lock:
            await loop.run_in_executor(None, self._files.write_new, job, job.to_sidecar(), inputs)
        self.keep(job)
        job.invalidate()
        self.index.put(job)
        self.events.emit(job, lifecycle.Transition.REQUEUE.event)

    async def commit(self, job: Job, change: lifecycle.Change) -> None:
        """Make `change` durable, then visible, then announce it. Raises IllegalTransition for
        a change the state machine does not have, and OSError (the job unchanged) when the
        disk refuses the write."""
        loop = asyncio.get_running_loop()
        async with job.lock:
            draft = lifecycle.applied(job, change)
            await loop.run_in_executor(None, self._files.write_state, draft)
            self._make_visible(job, draft, change)
            self._unsynced.written(job)  # the whole state is written

    def commit_now(self, job: Job, change: lifecycle.Change) -> None:
        """`commit` for start-up, before the server serves (blocking I/O, no lock needed)."""
        draft = lifecycle.applied(job, change)
        try:
            self._files.write_state(draft)
        except OSError as exc:
            self._make_visible(job, draft, change)
            self._unsynced.keep(job, exc, start_syncing=False)
            return
        self._make_visible(job, draft, change)

    async def settle(self, job: Job, change: lifecycle.Change) -> None:
        """An outcome the server has decided (a job finished, failed, was canceled): visible
        at once even when the disk refuses it now, and written as soon as the disk takes it,
        so memory and sidecar disagree no longer than the fault lasts."""
        try:
            await self.commit(job, change)
        except OSError as exc:
            async with job.lock:
                self._make_visible(job, lifecycle.applied(job, change), change)
            self._unsynced.keep(job, exc)

    def _make_visible(self, job: Job, draft: Job, change: lifecycle.Change) -> None:
        for name in (*change.fields, "status", "updated_at"):
            setattr(job, name, getattr(draft, name))
        job.invalidate()
        self.keep(job)
        self.index.put(job)
        published = change.transition is lifecycle.Transition.PUBLISH
        self.events.emit(job, change.transition.event, job.images[-1] if published else None)

    def remove_marker(self, endpoint: str, job_id: str) -> None:
        self._files.remove_marker(endpoint, job_id)

    # --- states the disk refused ------------------------------------------------------

    @property
    def unsynced(self) -> int:
        """Jobs whose state in memory the disk has not taken yet."""
        return len(self._unsynced)

    def start_syncing(self) -> None:
        """Retry unwritten states in the background (needs a running loop)."""
        self._unsynced.start_syncing()

    async def sync(self) -> int:
        """Write every state the disk refused so far; returns how many are still unwritten."""
        return await self._unsynced.sync()

    async def close(self) -> None:
        """Stop retrying in the background; one last attempt to write what is unwritten."""
        await self._unsynced.close()
        await asyncio.get_running_loop().run_in_executor(None, self.index.close)

    # --- a job's files ----------------------------------------------------------------

    def inputs_present(self, job: Job) -> bool:
        """Whether every input file is there as a plain file, reached without a link."""
        return self._files.inputs_present(job)

    async def restore_inputs(self, job: Job, inputs: dict[str, bytes]) -> None:
        """Write a re-queued job's input files again (the same bytes: they make its id), so a
        job whose inputs went missing runs again when it is posted again."""
        if self.inputs_present(job):
            return
        await asyncio.get_running_loop().run_in_executor(
            None, self._files.write_inputs, job, inputs
        )

    def clear_leftovers(self, job: Job) -> None:
        """Remove what an interrupted run left (sync: call it off the event loop)."""
        self._files.clear_leftovers(job)
