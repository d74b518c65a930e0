"""One run's workspace: a fresh work folder laid out for its endpoint, the script's argv and
environment, and the job's log opened for it. Blocking I/O: made in a worker thread."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sd_rest.endpoints import ENDPOINTS
from sd_rest.scripts import RunFolders, RunPlan, script_environment, sitecustomize_source
from sd_rest.settings import Settings
from sd_rest.state.files import is_link_error
from sd_rest.state.jobs import Job
from sd_rest.state.store import JobStore

log = logging.getLogger(__name__)


class InputsMissing(Exception):
    """The job's input files are gone from its folder (or are links)."""


class RunLog:
    """The job's `job.log`, appended to. The first write the disk refuses is reported to
    `on_fault`; later writes are dropped."""

    def __init__(self, path: Path, on_fault: Callable[[OSError, str], None]) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            if not is_link_error(exc):
                raise
            path.unlink()  # a link is never the log: never write through one
            fd = os.open(path, flags, 0o644)
        # Unbuffered: a full disk shows at the write that meets it, not at a later flush.
        self._file: BinaryIO | None = os.fdopen(fd, "ab", buffering=0)
        self._on_fault = on_fault

    def begin(self, header: bytes) -> None:
        """The run's first line: a refusal here is raised, since the run has not started."""
        try:
            if self._file is not None:
                self._file.write(header)
        except OSError:
            self.close()
            raise

    def write(self, data: bytes) -> None:
        if self._file is None:
            return
        try:
            self._file.write(data)
        except OSError as exc:
            self.close()
            self._on_fault(exc, "writing the job's log")

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as exc:
                log.debug("closing a job log failed: %s", exc)


@dataclass
class Workspace:
    folders: RunFolders
    argv: list[str]
    env: dict[str, str]
    log: RunLog

    @classmethod
    def create(
        cls,
        settings: Settings,
        store: JobStore,
        job: Job,
        plan: RunPlan,
        on_fault: Callable[[OSError, str], None],
    ) -> Workspace:
        """Raises InputsMissing, or OSError when the disk refuses the folder or the log."""
        if not store.inputs_present(job):
            raise InputsMissing(
                "the job's input files are missing from its folder; POST it again to restore them"
            )
        endpoint = ENDPOINTS[job.endpoint]
        layout = store.layout
        checkpoint = Path(job.checkpoint)
        root = layout.run_dir(job.endpoint, job.id)
        with store.folders_lock:
            # Empty, so that the scripts' file numbering starts at 00000.
            if root.is_symlink():
                root.unlink()
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
        folders = endpoint.make_run_folders(root, settings.repository, checkpoint)
        seed = endpoint.start_seed(plan)
        if seed is not None:
            folders.site.mkdir()
            (folders.site / "sitecustomize.py").write_text(sitecustomize_source(seed))
        inputs = layout.inputs_dir(job.endpoint, job.id)
        arguments = endpoint.arguments(job.params, plan, folders, checkpoint, inputs)
        argv = [str(settings.python), str(settings.repository / endpoint.script), *arguments]
        site = folders.site if seed is not None else None
        env = script_environment(os.environ, settings.repository, site)
        run_log = RunLog(layout.log(job.endpoint, job.id), on_fault)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        run_log.begin(f"\n=== sd-rest run {job.attempts + 1} at {stamp}: {argv!r}\n".encode())
        return cls(folders, argv, env, run_log)
