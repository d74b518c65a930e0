"""Job state, durable: one JSON sidecar per job folder and a marker per unfinished job (see
layout.py), and the jobs in memory.

Every change is a transition of lifecycle.py, written to disk (temp file, fsync, rename)
before it is visible in memory, then announced (events.py). Unfinished jobs stay in memory;
finished ones are read the first time somebody asks for them and kept in a bounded cache.
Invariant: an unfinished sidecar always has a marker (written first, removed last).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from sd_rest.state import lifecycle
from sd_rest.state.events import JobEvents
from sd_rest.state.files import (
    fsync_dir,
    is_link_error,
    is_plain_dir,
    is_plain_file,
    is_temp_file,
    make_dirs,
    read_plain,
    write_atomic,
)
from sd_rest.state.index import JobIndex
from sd_rest.state.jobs import Job
from sd_rest.state.layout import IMAGE_RE, INPUTS, RUN, Key, Layout
from sd_rest.state.quarantine import Quarantine

log = logging.getLogger(__name__)

SYNC_RETRY_SECONDS = 1.0
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
        self._live: dict[Key, Job] = {}  # unfinished jobs (and any being changed)
        self._finished: OrderedDict[Key, Job] = OrderedDict()  # most recently used last
        self._finished_cache = finished_cache
        # States the disk refused (full): visible in memory, retried until written.
        self._unsynced: dict[Key, Job] = {}
        self._syncer: asyncio.Task[None] | None = None

    @property
    def output(self) -> Path:
        return self.layout.output

    # --- lookups ----------------------------------------------------------------------

    def cached(self, endpoint: str, job_id: str) -> Job | None:
        """Memory only: the status GET's fast path."""
        key = (endpoint, job_id)
        job = self._live.get(key)
        if job is None:
            job = self._finished.get(key)
            if job is not None:
                self._finished.move_to_end(key)
        return job

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
        key = (job.endpoint, job.id)
        if job.status.finished:
            self._live.pop(key, None)
            self._finished[key] = job
            self._finished.move_to_end(key)
            while len(self._finished) > self._finished_cache:
                self._finished.popitem(last=False)
        else:
            self._finished.pop(key, None)
            self._live[key] = job
        return job

    def unfinished(self, endpoint: str, job_id: str) -> Job | None:
        """An unfinished job (they are all in memory), or None."""
        job = self._live.get((endpoint, job_id))
        return job if job is not None and not job.status.finished else None

    def unfinished_jobs(self) -> list[Job]:
        return [job for job in self._live.values() if not job.status.finished]

    def forget(self, endpoint: str, job_id: str) -> None:
        self._live.pop((endpoint, job_id), None)
        self._finished.pop((endpoint, job_id), None)
        self.index.remove(endpoint, job_id)

    def in_memory(self, endpoint: str, job_id: str) -> bool:
        return (endpoint, job_id) in self._live or (endpoint, job_id) in self._finished

    def __len__(self) -> int:
        return len(self._live) + len(self._finished)

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
            await loop.run_in_executor(None, self._write_new, job, job.to_sidecar(), inputs)
        self.keep(job)
        job.invalidate()
        self.index.put(job)
        self.events.emit(job, lifecycle.Transition.REQUEUE.event)

    def _write_new(self, job: Job, sidecar: dict[str, Any], inputs: dict[str, bytes]) -> None:
        try:
            self._write_marker(job)
            self._write_inputs(job, inputs)
            self._write_sidecar(job, sidecar)
        except OSError:
            # Never answered, so never a job: no half-written folder may stay (a full disk).
            shutil.rmtree(self.layout.job_dir(job.endpoint, job.id), ignore_errors=True)
            with contextlib.suppress(OSError):
                self._remove_marker(job)
            raise

    async def commit(self, job: Job, change: lifecycle.Change) -> None:
        """Make `change` durable, then visible, then announce it. Raises IllegalTransition for
        a change the state machine does not have, and OSError (the job unchanged) when the
        disk refuses the write."""
        loop = asyncio.get_running_loop()
        async with job.lock:
            draft = lifecycle.applied(job, change)
            await loop.run_in_executor(None, self._write_state, draft)
            self._make_visible(job, draft, change)
            self._unsynced.pop((job.endpoint, job.id), None)  # the whole state is written

    def commit_now(self, job: Job, change: lifecycle.Change) -> None:
        """`commit` for start-up, before the server serves (blocking I/O, no lock needed)."""
        draft = lifecycle.applied(job, change)
        try:
            self._write_state(draft)
        except OSError as exc:
            self._make_visible(job, draft, change)
            self._keep_unsynced(job, exc, start_syncing=False)
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
            self._keep_unsynced(job, exc)

    def _make_visible(self, job: Job, draft: Job, change: lifecycle.Change) -> None:
        for name in (*change.fields, "status", "updated_at"):
            setattr(job, name, getattr(draft, name))
        job.invalidate()
        self.keep(job)
        self.index.put(job)
        published = change.transition is lifecycle.Transition.PUBLISH
        self.events.emit(job, change.transition.event, job.images[-1] if published else None)

    def _write_state(self, job: Job) -> None:
        if job.status.finished:
            self._write_sidecar(job, job.to_sidecar())
            self._remove_marker(job)
        else:
            self._write_marker(job)  # a re-queued job needs its marker back
            self._write_sidecar(job, job.to_sidecar())

    def _write_sidecar(self, job: Job, sidecar: dict[str, Any]) -> None:
        folder = self.layout.job_dir(job.endpoint, job.id)
        make_dirs(folder)
        data = json.dumps(sidecar, indent=1, ensure_ascii=False).encode()
        write_atomic(folder / "job.json", data)

    def _write_marker(self, job: Job) -> None:
        make_dirs(self.layout.queue_dir)
        marker = self.layout.marker(job.endpoint, job.id)
        if not marker.exists():
            marker.touch()
            fsync_dir(self.layout.queue_dir)

    def _remove_marker(self, job: Job) -> None:
        self.remove_marker(job.endpoint, job.id)

    def remove_marker(self, endpoint: str, job_id: str) -> None:
        try:
            self.layout.marker(endpoint, job_id).unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.layout.queue_dir)

    # --- states the disk refused ------------------------------------------------------

    def _keep_unsynced(self, job: Job, exc: OSError, start_syncing: bool = True) -> None:
        log.warning(
            "could not write the state of job %s/%s (%s): it is kept in memory and written "
            "as soon as the disk allows",
            job.endpoint,
            job.id,
            exc.strerror or exc,
        )
        self._unsynced[(job.endpoint, job.id)] = job
        if start_syncing:
            self.start_syncing()

    @property
    def unsynced(self) -> int:
        """Jobs whose state in memory the disk has not taken yet."""
        return len(self._unsynced)

    def start_syncing(self) -> None:
        """Retry unwritten states in the background (needs a running loop)."""
        if self._unsynced and (self._syncer is None or self._syncer.done()):
            self._syncer = asyncio.get_running_loop().create_task(self._sync_until_written())

    async def _sync_until_written(self) -> None:
        while await self.sync():
            await asyncio.sleep(SYNC_RETRY_SECONDS)

    async def sync(self) -> int:
        """Write every state the disk refused so far; returns how many are still unwritten."""
        loop = asyncio.get_running_loop()
        for key, job in list(self._unsynced.items()):
            async with job.lock:
                if self._unsynced.get(key) is not job:
                    continue  # a commit has written it meanwhile
                try:
                    await loop.run_in_executor(None, self._write_state, job)
                except OSError:
                    continue
                del self._unsynced[key]
                log.info("wrote the state of job %s/%s at last", job.endpoint, job.id)
        return len(self._unsynced)

    async def close(self) -> None:
        """Stop retrying in the background; one last attempt to write what is unwritten."""
        if self._syncer is not None:
            self._syncer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._syncer
        if await self.sync():
            log.warning(
                "%d job state(s) could not be written: the next start resumes those jobs",
                len(self._unsynced),
            )
        await asyncio.get_running_loop().run_in_executor(None, self.index.close)

    # --- a job's files ----------------------------------------------------------------

    def inputs_present(self, job: Job) -> bool:
        """Whether every input file is there as a plain file, reached without a link."""
        if not job.inputs:
            return True
        folder = self.layout.inputs_dir(job.endpoint, job.id)
        return is_plain_dir(folder) and all(
            is_plain_file(folder / name) for name in job.inputs.values()
        )

    async def restore_inputs(self, job: Job, inputs: dict[str, bytes]) -> None:
        """Write a re-queued job's input files again (the same bytes: they make its id), so a
        job whose inputs went missing runs again when it is posted again."""
        if self.inputs_present(job):
            return
        await asyncio.get_running_loop().run_in_executor(None, self._write_inputs, job, inputs)

    def _write_inputs(self, job: Job, inputs: dict[str, bytes]) -> None:
        folder = self.layout.inputs_dir(job.endpoint, job.id)
        if folder.is_symlink():
            folder.unlink()
        make_dirs(folder)
        for field, data in inputs.items():
            write_atomic(folder / job.inputs[field], data)

    def clear_leftovers(self, job: Job) -> None:
        """Remove what an interrupted run left: its work folder, temp files (of images, of the
        sidecar, of inputs) and PNGs published but never recorded in the sidecar."""
        folder = self.layout.job_dir(job.endpoint, job.id)
        shutil.rmtree(folder / RUN, ignore_errors=True)
        for parent in (folder, folder / INPUTS):
            try:
                entries = list(os.scandir(parent))
            except FileNotFoundError:
                continue
            for entry in entries:
                match = IMAGE_RE.fullmatch(entry.name) if parent == folder else None
                if is_temp_file(entry.name) or (match and int(match.group(1)) > len(job.images)):
                    Path(entry.path).unlink(missing_ok=True)
