"""Job state on disk: one JSON sidecar per job folder, plus a marker per unfinished job.

Layout under the output folder:
    <endpoint>/<id>/job.json     the sidecar (everything needed to run the job again)
    <endpoint>/<id>/job.log      every run's script output
    <endpoint>/<id>/inputs/      uploads, normalised to PNG
    <endpoint>/<id>/run/         the current run's work folder (script outdir, inpaint cwd)
    <endpoint>/<id>/<n>.png      published images
    .queue/<endpoint>.<id>       marker: this job is not finished yet
    .quarantine/                 job folders whose sidecar could not be read

The markers make a restart cheap: only unfinished jobs are read at start; finished ones are read
the first time somebody asks for them. Invariant: an unfinished sidecar always has a marker
(the marker is written first and removed last).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .endpoints import ENDPOINTS
from .files import (
    fsync_dir,
    is_link_error,
    is_plain_dir,
    is_plain_file,
    is_temp_file,
    make_dirs,
    read_plain,
    write_atomic,
)
from .jobs import Job, Status
from .processes import end_orphan

log = logging.getLogger(__name__)

SIDECAR = "job.json"
LOG = "job.log"
INPUTS = "inputs"
RUN = "run"
ID_RE = re.compile(r"^[0-9a-f]{32}$")
IMAGE_RE = re.compile(r"^([1-9][0-9]*)\.png$")
STALE_TEMP_SECONDS = 60.0
SYNC_RETRY_SECONDS = 1.0
# A sidecar that is there but cannot be read as a file: a damaged job, not a passing fault.
_UNREADABLE = frozenset({errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EINVAL})


class JobStore:
    def __init__(self, output: Path) -> None:
        self.output = output
        self.queue_dir = output / ".queue"
        self.quarantine_dir = output / ".quarantine"
        self._jobs: dict[tuple[str, str], Job] = {}
        # States the disk refused (full): visible in memory, retried until written.
        self._unsynced: dict[tuple[str, str], Job] = {}
        self._syncer: asyncio.Task[None] | None = None
        # Held while a run folder is made, a leftover one removed or a folder quarantined, so
        # that the background sweep never takes the folder of a run that has just started.
        self._folders = threading.Lock()

    # --- paths ------------------------------------------------------------------------

    def job_dir(self, endpoint: str, job_id: str) -> Path:
        return self.output / endpoint / job_id

    def folder(self, job: Job) -> Path:
        return self.job_dir(job.endpoint, job.id)

    def log_path(self, job: Job) -> Path:
        return self.folder(job) / LOG

    def run_dir(self, job: Job) -> Path:
        return self.folder(job) / RUN

    def image_path(self, job: Job, n: int) -> Path:
        return self.folder(job) / f"{n}.png"

    def input_path(self, job: Job, field: str) -> Path:
        return self.folder(job) / INPUTS / job.inputs[field]

    def script_markers(self, job: Job) -> tuple[str, ...]:
        """What the command line of this job's script holds: its run folder, its script."""
        return (str(self.run_dir(job)), ENDPOINTS[job.endpoint].script)

    def _marker(self, endpoint: str, job_id: str) -> Path:
        return self.queue_dir / f"{endpoint}.{job_id}"

    # --- lookups ----------------------------------------------------------------------

    def cached(self, endpoint: str, job_id: str) -> Job | None:
        """Memory only: the status GET's fast path."""
        return self._jobs.get((endpoint, job_id))

    async def get(self, endpoint: str, job_id: str) -> Job | None:
        job = self._jobs.get((endpoint, job_id))
        if job is not None:
            return job
        loaded = await asyncio.get_running_loop().run_in_executor(
            None, self._read_job, endpoint, job_id
        )
        if loaded is None:
            return None
        return self._jobs.setdefault((endpoint, job_id), loaded)

    def __len__(self) -> int:
        return len(self._jobs)

    def _read_job(self, endpoint: str, job_id: str) -> Job | None:
        folder = self.job_dir(endpoint, job_id)
        if os.path.islink(folder.parent):
            return None  # a link is never content (recover() moves such links away)
        if os.path.islink(folder):
            self._quarantine(folder, "the job folder is a symbolic link", None)
            return None
        try:
            data = read_plain(folder / SIDECAR)
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
            self._quarantine(self.job_dir(endpoint, job_id), f"corrupt sidecar: {exc}", data)
            return None
        return job

    # --- changes: durable first, visible after ------------------------------------------

    async def add(self, job: Job, inputs: dict[str, bytes]) -> None:
        """Persist a new job with its input files; only then is it visible. Raises OSError
        (with nothing of the job left on disk) when the disk refuses it."""
        loop = asyncio.get_running_loop()
        async with job.lock:
            await loop.run_in_executor(None, self._write_new, job, job.to_sidecar(), inputs)
        self._jobs[(job.endpoint, job.id)] = job
        job.invalidate()

    def _write_new(self, job: Job, sidecar: dict[str, Any], inputs: dict[str, bytes]) -> None:
        try:
            self._write_marker(job.endpoint, job.id)
            self._write_inputs(job, inputs)
            self._write_sidecar(job.endpoint, job.id, sidecar)
        except OSError:
            # Never answered, so never a job: no half-written folder may stay (a full disk).
            shutil.rmtree(self.folder(job), ignore_errors=True)
            with contextlib.suppress(OSError):
                self._remove_marker(job.endpoint, job.id)
            raise

    async def save(self, job: Job, **changes: Any) -> None:
        """Apply `changes` to the job: written to the sidecar first, then visible in memory.
        Raises OSError, with the job unchanged, when the disk refuses the write."""
        loop = asyncio.get_running_loop()
        async with job.lock:
            draft = copy.copy(job)
            for name, value in changes.items():
                setattr(draft, name, value)
            draft.updated_at = time.time()
            sidecar = draft.to_sidecar()
            if Status(sidecar["status"]).finished:
                await loop.run_in_executor(None, self._write_finished, job, sidecar)
            else:
                await loop.run_in_executor(None, self._write_unfinished, job, sidecar)
            for name, value in changes.items():
                setattr(job, name, value)
            job.updated_at = draft.updated_at
            job.invalidate()
            self._unsynced.pop((job.endpoint, job.id), None)  # the whole state is written

    async def settle(self, job: Job, **changes: Any) -> None:
        """An outcome the server has decided (a job finished, failed, was canceled): visible
        at once even when the disk refuses it now, and written as soon as the disk takes it,
        so memory and sidecar disagree no longer than the fault lasts."""
        try:
            await self.save(job, **changes)
        except OSError as exc:
            for name, value in changes.items():
                setattr(job, name, value)
            job.updated_at = time.time()
            job.invalidate()
            self._keep_unsynced(job, exc)

    def _keep_unsynced(self, job: Job, exc: OSError) -> None:
        log.warning(
            "could not write the state of job %s/%s (%s): it is kept in memory and written "
            "as soon as the disk allows",
            job.endpoint,
            job.id,
            exc.strerror or exc,
        )
        self._unsynced[(job.endpoint, job.id)] = job
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
                    continue  # a save has written it meanwhile
                sidecar = job.to_sidecar()
                write = self._write_finished if job.status.finished else self._write_unfinished
                try:
                    await loop.run_in_executor(None, write, job, sidecar)
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

    def _write_unfinished(self, job: Job, sidecar: dict[str, Any]) -> None:
        self._write_marker(job.endpoint, job.id)  # a re-queued job needs its marker back
        self._write_sidecar(job.endpoint, job.id, sidecar)

    def _write_finished(self, job: Job, sidecar: dict[str, Any]) -> None:
        self._write_sidecar(job.endpoint, job.id, sidecar)
        self._remove_marker(job.endpoint, job.id)

    def _write_sidecar(self, endpoint: str, job_id: str, sidecar: dict[str, Any]) -> None:
        folder = self.job_dir(endpoint, job_id)
        make_dirs(folder)
        data = json.dumps(sidecar, indent=1, ensure_ascii=False).encode()
        write_atomic(folder / SIDECAR, data)

    def _write_marker(self, endpoint: str, job_id: str) -> None:
        make_dirs(self.queue_dir)
        marker = self._marker(endpoint, job_id)
        if not marker.exists():
            marker.touch()
            fsync_dir(self.queue_dir)

    def _remove_marker(self, endpoint: str, job_id: str) -> None:
        try:
            self._marker(endpoint, job_id).unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.queue_dir)

    # --- runs ---------------------------------------------------------------------------

    def fresh_run_dir(self, job: Job) -> Path:
        """An empty work folder for a new run, so the scripts' numbering starts at 00000."""
        root = self.run_dir(job)
        with self._folders:
            if root.is_symlink():
                root.unlink()
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
        return root

    def inputs_present(self, job: Job) -> bool:
        """Whether every input file is there as a plain file, reached without a link."""
        folder = self.folder(job) / INPUTS
        if not job.inputs:
            return True
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
        folder = self.folder(job) / INPUTS
        if folder.is_symlink():
            folder.unlink()
        make_dirs(folder)
        for field, data in inputs.items():
            write_atomic(folder / job.inputs[field], data)

    def remove_run_dir(self, job: Job) -> None:
        shutil.rmtree(self.run_dir(job), ignore_errors=True)

    # --- start-up -----------------------------------------------------------------------

    def recover(self) -> list[Job]:
        """Load every unfinished job, sorted by submission. Their leftovers are not touched
        yet: a script a dead server left running must be ended first (`resume` then clears)."""
        for endpoint in ENDPOINTS:
            if os.path.islink(self.output / endpoint):
                # Jobs are never read or written through a link: move it out of the way.
                self._quarantine(self.output / endpoint, "an endpoint folder is a link", None)
        unfinished: list[Job] = []
        for endpoint, job_id in self._markers():
            folder = self.job_dir(endpoint, job_id)
            if not (folder / SIDECAR).exists():
                # The POST that made this folder was never answered: nothing to keep.
                shutil.rmtree(folder, ignore_errors=True)
                self._remove_marker(endpoint, job_id)
                continue
            job = self._read_job(endpoint, job_id)
            if job is None:
                self._remove_marker(endpoint, job_id)
                continue
            self._jobs[(endpoint, job_id)] = job
            if job.status.finished:
                # Died between the terminal sidecar and the marker's removal.
                self.clear_leftovers(job)
                self._remove_marker(endpoint, job_id)
                continue
            unfinished.append(job)
        unfinished.sort(key=lambda job: job.seq)
        return unfinished

    def resume(self, job: Job) -> None:
        """Make an interrupted job ready to run again, durably: clear what its last run left,
        keep only images whose files are there, and mark it QUEUED without a script."""
        self.clear_leftovers(job)
        images = job.images
        for record in job.images:
            if not is_plain_file(self.image_path(job, record.n)):
                images = job.images[: record.n - 1]
                break
        if images != job.images:
            log.warning(
                "job %s/%s: image %d is missing on disk; it and the later ones will be made again",
                job.endpoint,
                job.id,
                len(images) + 1,
            )
        if job.status is Status.QUEUED and job.pid is None and images == job.images:
            return
        job.images = images
        job.status = Status.QUEUED
        job.pid = None
        job.updated_at = time.time()
        job.invalidate()
        try:
            self._write_unfinished(job, job.to_sidecar())
        except OSError as exc:
            self._keep_unsynced_at_start(job, exc)
            return
        self.clear_leftovers(job)  # images beyond the kept ones

    def _keep_unsynced_at_start(self, job: Job, exc: OSError) -> None:
        # No loop runs yet: the manager starts the retries with the server.
        log.warning(
            "could not write the state of job %s/%s (%s): written as soon as the disk allows",
            job.endpoint,
            job.id,
            exc.strerror or exc,
        )
        self._unsynced[(job.endpoint, job.id)] = job

    def _markers(self) -> Iterator[tuple[str, str]]:
        try:
            names = os.listdir(self.queue_dir)
        except FileNotFoundError:
            return
        for name in names:
            endpoint, _, job_id = name.rpartition(".")
            if endpoint in ENDPOINTS and ID_RE.match(job_id):
                yield endpoint, job_id
            else:
                (self.queue_dir / name).unlink(missing_ok=True)

    def clear_leftovers(self, job: Job) -> None:
        """Remove what an interrupted run left: its work folder, temp files (of images, of the
        sidecar, of inputs) and PNGs published but never recorded in the sidecar."""
        folder = self.folder(job)
        shutil.rmtree(folder / RUN, ignore_errors=True)
        for parent in (folder, folder / INPUTS):
            try:
                entries = list(os.scandir(parent))
            except FileNotFoundError:
                continue
            for entry in entries:
                match = IMAGE_RE.match(entry.name) if parent == folder else None
                if is_temp_file(entry.name) or (match and int(match.group(1)) > len(job.images)):
                    Path(entry.path).unlink(missing_ok=True)

    def sweep(self, stop: threading.Event | None = None) -> int:
        """Background check of every job folder not in memory: quarantine damaged sidecars,
        remove stale temp files and a finished job's leftover run folder. Stops early when
        `stop` is set. Returns how many folders were quarantined."""
        quarantined = 0
        now = time.time()
        for endpoint, job_id, folder in self._job_folders():
            if stop is not None and stop.is_set():
                break
            if not self._idle(endpoint, job_id):
                continue
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                if is_temp_file(entry.name) and now - entry.stat().st_mtime > STALE_TEMP_SECONDS:
                    Path(entry.path).unlink(missing_ok=True)
            if not (folder / SIDECAR).exists():
                continue
            job = self._read_job(endpoint, job_id)
            if job is None:
                quarantined += 1
            elif job.status.finished and (folder / RUN).exists():
                with self._folders:
                    # Checked again under the lock: a request may have loaded and re-queued it.
                    if self._idle(endpoint, job_id):
                        shutil.rmtree(folder / RUN, ignore_errors=True)
        return quarantined

    def _idle(self, endpoint: str, job_id: str) -> bool:
        """Neither in memory nor unfinished: nothing else can be touching this folder."""
        return (endpoint, job_id) not in self._jobs and not self._marker(endpoint, job_id).exists()

    def _job_folders(self) -> Iterator[tuple[str, str, Path]]:
        for endpoint in ENDPOINTS:
            try:
                entries = list(os.scandir(self.output / endpoint))
            except FileNotFoundError:
                continue
            for entry in entries:
                if ID_RE.match(entry.name) and entry.is_dir(follow_symlinks=False):
                    yield endpoint, entry.name, Path(entry.path)

    def delete_incomplete(self) -> int:
        """Before serving: remove every job that is not COMPLETE, with all its files (a script
        a dead server left running for it is ended first). Returns how many."""
        removed = 0
        for endpoint, job_id, folder in self._job_folders():
            job = self._read_job(endpoint, job_id)
            if job is not None and job.status is Status.COMPLETE:
                continue
            if job is not None and job.pid is not None:
                end_orphan(job.pid, self.script_markers(job))
            if folder.exists():
                shutil.rmtree(folder)
                removed += 1
            self._jobs.pop((endpoint, job_id), None)
        shutil.rmtree(self.queue_dir, ignore_errors=True)
        return removed

    def _quarantine(self, folder: Path, reason: str, bad: bytes | None) -> None:
        """Move a job folder whose sidecar cannot be used out of the way, with a warning.
        `bad`: the sidecar bytes found damaged; the folder is moved only if they are still
        there, so a job made anew under the same id in the meantime is never taken."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{folder.parent.name}-{folder.name}-{stamp}-{secrets.token_hex(3)}"
        target = self.quarantine_dir / name
        with self._folders:
            if bad is not None:
                try:
                    if (folder / SIDECAR).read_bytes() != bad:
                        return
                except OSError:
                    return  # already moved, or replaced by a new job still being written
            try:
                make_dirs(self.quarantine_dir)
                folder.rename(target)
            except OSError as exc:
                log.warning("could not quarantine %s (%s): %s", folder / SIDECAR, reason, exc)
                return
            fsync_dir(folder.parent)
        log.warning("moved %s to %s: %s", folder / SIDECAR, target, reason)
