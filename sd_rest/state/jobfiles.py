"""A job's files on disk, written durably (temp file, fsync, rename): its sidecar (job.json),
its marker while it is unfinished (see layout.py), its input files, and the leftovers of an
interrupted run. Blocking I/O: call it off the event loop.
Invariant: an unfinished sidecar always has a marker (written first, removed last)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from sd_rest.state.files import (
    fsync_dir,
    is_plain_dir,
    is_plain_file,
    is_temp_file,
    make_dirs,
    write_atomic,
)
from sd_rest.state.jobs import Job
from sd_rest.state.layout import IMAGE_RE, INPUTS, RUN, Layout


class JobFiles:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def write_new(self, job: Job, sidecar: dict[str, Any], inputs: dict[str, bytes]) -> None:
        """A new job's marker, inputs and sidecar; raises OSError with nothing of it left."""
        try:
            self._write_marker(job)
            self.write_inputs(job, inputs)
            self._write_sidecar(job, sidecar)
        except OSError:
            # Never answered, so never a job: no half-written folder may stay (a full disk).
            shutil.rmtree(self.layout.job_dir(job.endpoint, job.id), ignore_errors=True)
            with contextlib.suppress(OSError):
                self.remove_marker(job.endpoint, job.id)
            raise

    def write_state(self, job: Job) -> None:
        """The whole state of `job`, with its marker kept while it is unfinished."""
        if job.status.finished:
            self._write_sidecar(job, job.to_sidecar())
            self.remove_marker(job.endpoint, job.id)
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

    def remove_marker(self, endpoint: str, job_id: str) -> None:
        try:
            self.layout.marker(endpoint, job_id).unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.layout.queue_dir)

    def inputs_present(self, job: Job) -> bool:
        """Whether every input file is there as a plain file, reached without a link."""
        if not job.inputs:
            return True
        folder = self.layout.inputs_dir(job.endpoint, job.id)
        return is_plain_dir(folder) and all(
            is_plain_file(folder / name) for name in job.inputs.values()
        )

    def write_inputs(self, job: Job, inputs: dict[str, bytes]) -> None:
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
