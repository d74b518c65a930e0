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
import copy
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .endpoints import ENDPOINTS
from .files import fsync_dir, is_temp_file, write_atomic
from .jobs import Job, Status

log = logging.getLogger(__name__)

SIDECAR = "job.json"
LOG = "job.log"
INPUTS = "inputs"
RUN = "run"
ID_RE = re.compile(r"^[0-9a-f]{32}$")
IMAGE_RE = re.compile(r"^([1-9][0-9]*)\.png$")
STALE_TEMP_SECONDS = 60.0


class JobStore:
    def __init__(self, output: Path) -> None:
        self.output = output
        self.queue_dir = output / ".queue"
        self.quarantine_dir = output / ".quarantine"
        self._jobs: dict[tuple[str, str], Job] = {}

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
        path = self.job_dir(endpoint, job_id) / SIDECAR
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._quarantine(self.job_dir(endpoint, job_id), f"unreadable sidecar: {exc}")
            return None
        try:
            job = Job.from_sidecar(json.loads(data))
            if (job.endpoint, job.id) != (endpoint, job_id):
                raise ValueError(f"sidecar names {job.endpoint}/{job.id}")
        except (ValueError, KeyError, TypeError) as exc:
            self._quarantine(self.job_dir(endpoint, job_id), f"corrupt sidecar: {exc}")
            return None
        return job

    # --- changes: durable first, visible after ------------------------------------------

    async def add(self, job: Job, inputs: dict[str, bytes]) -> None:
        """Persist a new job with its input files; only then is it visible."""
        loop = asyncio.get_running_loop()
        async with job.lock:
            await loop.run_in_executor(None, self._write_new, job, job.to_sidecar(), inputs)
        self._jobs[(job.endpoint, job.id)] = job
        job.invalidate()

    def _write_new(self, job: Job, sidecar: dict[str, Any], inputs: dict[str, bytes]) -> None:
        self._write_marker(job.endpoint, job.id)
        folder = self.folder(job) / INPUTS
        folder.mkdir(parents=True, exist_ok=True)
        for field, data in inputs.items():
            write_atomic(folder / job.inputs[field], data)
        self._write_sidecar(job.endpoint, job.id, sidecar)

    async def save(self, job: Job, **changes: Any) -> None:
        """Apply `changes` to the job: written to the sidecar first, then visible in memory."""
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

    def _write_unfinished(self, job: Job, sidecar: dict[str, Any]) -> None:
        self._write_marker(job.endpoint, job.id)  # a re-queued job needs its marker back
        self._write_sidecar(job.endpoint, job.id, sidecar)

    def _write_finished(self, job: Job, sidecar: dict[str, Any]) -> None:
        self._write_sidecar(job.endpoint, job.id, sidecar)
        self._remove_marker(job.endpoint, job.id)

    def _write_sidecar(self, endpoint: str, job_id: str, sidecar: dict[str, Any]) -> None:
        folder = self.job_dir(endpoint, job_id)
        folder.mkdir(parents=True, exist_ok=True)
        data = json.dumps(sidecar, indent=1, ensure_ascii=False).encode()
        write_atomic(folder / SIDECAR, data)

    def _write_marker(self, endpoint: str, job_id: str) -> None:
        self.queue_dir.mkdir(parents=True, exist_ok=True)
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

    # --- start-up -----------------------------------------------------------------------

    def recover(self) -> list[Job]:
        """Load every unfinished job (sorted by submission) and clear its leftovers."""
        unfinished: list[Job] = []
        for endpoint, job_id in self._markers():
            folder = self.job_dir(endpoint, job_id)
            if not (folder / SIDECAR).exists():
                # The POST that made this folder was never answered: nothing to keep.
                shutil.rmtree(folder, ignore_errors=True)
                self._remove_marker(endpoint, job_id)
                continue
            job = self._read_job(endpoint, job_id)
            if job is None or job.status.finished:
                self._remove_marker(endpoint, job_id)
                if job is not None:
                    self._jobs[(endpoint, job_id)] = job
                continue
            self.clear_leftovers(job)
            self._jobs[(endpoint, job_id)] = job
            unfinished.append(job)
        unfinished.sort(key=lambda job: job.seq)
        return unfinished

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
        """Remove what an interrupted run left: its work folder, temp files, unrecorded PNGs."""
        folder = self.folder(job)
        shutil.rmtree(folder / RUN, ignore_errors=True)
        for entry in os.scandir(folder):
            match = IMAGE_RE.match(entry.name)
            if is_temp_file(entry.name) or (match and int(match.group(1)) > len(job.images)):
                Path(entry.path).unlink(missing_ok=True)

    def sweep(self) -> int:
        """Background check of every job folder not in memory: quarantine damaged sidecars and
        remove stale temp files. Returns how many folders were quarantined."""
        quarantined = 0
        now = time.time()
        for endpoint, job_id, folder in self._job_folders():
            if (endpoint, job_id) in self._jobs or self._marker(endpoint, job_id).exists():
                continue
            for entry in os.scandir(folder):
                if is_temp_file(entry.name) and now - entry.stat().st_mtime > STALE_TEMP_SECONDS:
                    Path(entry.path).unlink(missing_ok=True)
            if (folder / SIDECAR).exists() and self._read_job(endpoint, job_id) is None:
                quarantined += 1
        return quarantined

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
        """Remove every job that is not COMPLETE, with all its files. Returns how many."""
        removed = 0
        for endpoint, job_id, folder in self._job_folders():
            job = self._read_job(endpoint, job_id)
            if job is not None and job.status is Status.COMPLETE:
                continue
            if folder.exists():
                shutil.rmtree(folder)
                removed += 1
            self._jobs.pop((endpoint, job_id), None)
        shutil.rmtree(self.queue_dir, ignore_errors=True)
        return removed

    def _quarantine(self, folder: Path, reason: str) -> None:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        target = self.quarantine_dir / f"{folder.parent.name}-{folder.name}-{int(time.time())}"
        try:
            folder.rename(target)
        except OSError as exc:
            log.warning("could not quarantine %s (%s): %s", folder, reason, exc)
            return
        log.warning("moved %s to %s: %s", folder / SIDECAR, target, reason)
