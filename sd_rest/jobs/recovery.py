"""What a start finds on disk, put right before serving: unfinished jobs resumed in submission
order (after ending any script a killed server left running), the debris of interrupted runs
cleared; and in the background, finished job folders checked. Also `--delete-incomplete`."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from sd_rest.endpoints import ENDPOINTS
from sd_rest.runs.processes import end_orphan
from sd_rest.state import lifecycle
from sd_rest.state.files import is_plain_file, is_temp_file
from sd_rest.state.jobs import Job, Status
from sd_rest.state.layout import ID_RE, RUN, SIDECAR, parse_marker
from sd_rest.state.store import JobStore

log = logging.getLogger(__name__)

STALE_TEMP_SECONDS = 60.0


class Recovery:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.layout = store.layout

    # --- start-up -----------------------------------------------------------------------

    def recover(self) -> list[Job]:
        """Before serving: every unfinished job made ready to run again, durably, sorted by
        submission. Blocking I/O."""
        for endpoint in ENDPOINTS:
            if os.path.islink(self.layout.endpoint_dir(endpoint)):
                # Jobs are never read or written through a link: move it out of the way.
                self.store.quarantine.move(
                    self.layout.endpoint_dir(endpoint), "an endpoint folder is a link", None
                )
        unfinished = sorted(self._unfinished(), key=lambda job: job.seq)
        for job in unfinished:
            markers = self.layout.script_markers(job.endpoint, job.id)
            if job.pid is not None and end_orphan(job.pid, markers):
                log.warning(
                    "ended script %d left running by a previous server (%s/%s)",
                    job.pid,
                    job.endpoint,
                    job.id,
                )
        queued = [job for job in unfinished if self.resume(job)]
        if queued:
            log.info("resuming %d unfinished job(s)", len(queued))
        # In the index's own thread: the first listing waits for it, serving does not.
        self.store.index.reconcile()
        return queued

    def _unfinished(self) -> Iterator[Job]:
        for endpoint, job_id in self._markers():
            folder = self.layout.job_dir(endpoint, job_id)
            if not (folder / SIDECAR).exists():
                # The POST that made this folder was never answered: nothing to keep.
                shutil.rmtree(folder, ignore_errors=True)
                self.store.remove_marker(endpoint, job_id)
                continue
            job = self.store.read_job(endpoint, job_id)
            if job is None:
                self.store.remove_marker(endpoint, job_id)
                continue
            if job.status.finished:
                # Died between the finished sidecar and the marker's removal.
                self.store.clear_leftovers(job)
                self.store.remove_marker(endpoint, job_id)
                continue
            yield self.store.keep(job)

    def _markers(self) -> Iterator[tuple[str, str]]:
        try:
            names = os.listdir(self.layout.queue_dir)
        except FileNotFoundError:
            return
        for name in names:
            key = parse_marker(name)
            if key is None:
                (self.layout.queue_dir / name).unlink(missing_ok=True)
            else:
                yield key

    def resume(self, job: Job) -> bool:
        """Make an interrupted job ready to run again: clear what its last run left, keep only
        the images whose files are there, and queue it without a script (or complete it, when
        every image is there). Returns whether it is queued."""
        self.store.clear_leftovers(job)
        images = job.images
        for record in job.images:
            if not is_plain_file(self.layout.image(job.endpoint, job.id, record.n)):
                images = job.images[: record.n - 1]
                break
        if images != job.images:
            log.warning(
                "job %s/%s: image %d is missing on disk; it and the later ones will be made again",
                job.endpoint,
                job.id,
                len(images) + 1,
            )
        if len(images) >= job.total_images:
            # Every image was published but the server died before saying COMPLETE.
            self.store.commit_now(job, lifecycle.complete(time.time()))
            return False
        if job.status is Status.QUEUED and job.pid is None and images == job.images:
            return True
        self.store.commit_now(job, lifecycle.requeue(images))
        self.store.clear_leftovers(job)  # images beyond the kept ones
        return True

    # --- in the background ------------------------------------------------------------

    def sweep(self, stop: threading.Event | None = None) -> int:
        """Check every job folder not in memory: quarantine damaged sidecars, remove stale
        temp files and a finished job's leftover run folder. Stops early when `stop` is set.
        Returns how many folders were quarantined."""
        quarantined = 0
        now = time.time()
        for endpoint, job_id, folder in self.job_folders():
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
            job = self.store.read_job(endpoint, job_id)
            if job is None:
                quarantined += 1
            elif job.status.finished and (folder / RUN).exists():
                with self.store.folders_lock:
                    # Checked again under the lock: a request may have loaded and re-queued it.
                    if self._idle(endpoint, job_id):
                        shutil.rmtree(folder / RUN, ignore_errors=True)
        return quarantined

    def _idle(self, endpoint: str, job_id: str) -> bool:
        """Neither in memory nor unfinished: nothing else can be touching this folder."""
        return (
            not self.store.in_memory(endpoint, job_id)
            and not self.layout.marker(endpoint, job_id).exists()
        )

    def job_folders(self) -> Iterator[tuple[str, str, Path]]:
        for endpoint in ENDPOINTS:
            try:
                entries = list(os.scandir(self.layout.endpoint_dir(endpoint)))
            except FileNotFoundError:
                continue
            for entry in entries:
                if ID_RE.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                    yield endpoint, entry.name, Path(entry.path)

    # --- --delete-incomplete ----------------------------------------------------------

    def delete_incomplete(self) -> int:
        """Before serving: remove every job that is not COMPLETE, with all its files (a script
        a dead server left running for it is ended first). Returns how many."""
        removed = 0
        for endpoint, job_id, folder in self.job_folders():
            job = self.store.read_job(endpoint, job_id)
            if job is not None and job.status is Status.COMPLETE:
                continue
            if job is not None and job.pid is not None:
                end_orphan(job.pid, self.layout.script_markers(endpoint, job_id))
            if folder.exists():
                shutil.rmtree(folder)
                removed += 1
            self.store.forget(endpoint, job_id)
        shutil.rmtree(self.layout.queue_dir, ignore_errors=True)
        return removed
