"""Run one job's script once: spawn it on a pty, stream its output, publish its images."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

import pexpect

from .config import Settings
from .disk import is_disk_full
from .endpoints import IMAGE_TO_IMAGE, INPAINT_IMAGE
from .exits import ScriptExit, failure_message
from .files import is_link_error, write_atomic
from .jobs import ImageRecord, Job, Status
from .pngfile import is_complete_png
from .processes import reset_signals, signal_group
from .progress import ProgressParser, last_error
from .scripts import (
    INPAINT_CHECKPOINT,
    INPAINT_CONFIG,
    INPAINT_INPUT_NAME,
    PTY_COLUMNS,
    PTY_ROWS,
    RunPlan,
    plan_run,
    script_arguments,
    script_environment,
    script_path,
    sitecustomize_source,
)
from .store import JobStore
from .watcher import watch_folder

log = logging.getLogger(__name__)

SAMPLE_RE = re.compile(r"^(\d{5})\.png$")
CANCEL_KILL_AFTER = 0.5  # seconds between SIGTERM and SIGKILL when a client cancels
READ_SIZE = 65536


@dataclass(frozen=True)
class RunFolders:
    root: Path  # <job>/run: removed after the run
    outdir: Path  # the script's --outdir
    images: Path  # where its PNGs appear
    cwd: Path


class JobRunner:
    """One run of one job. `run()` returns when the script has exited and the job's outcome is
    durable; `cancel()` and `stop()` end the script early."""

    def __init__(self, settings: Settings, store: JobStore, job: Job) -> None:
        self.settings = settings
        self.store = store
        self.job = job
        self.plan: RunPlan = plan_run(job.params, job.total_images, len(job.images))
        self.parser = ProgressParser()
        self._pid: int | None = None  # the running script, until it is reaped
        self._grace = settings.shutdown_grace
        self._canceled = False
        self._stopping = False
        self._publish_lock = asyncio.Lock()
        self._taken = 0  # this run's output files already published
        self._start_error: str | None = None
        # The first write to the output folder that failed (a full disk), and what it was.
        self._fault: tuple[OSError, str] | None = None
        self._logfile: BinaryIO | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._watcher: asyncio.Task[None] | None = None

    # --- control ----------------------------------------------------------------------

    def cancel(self) -> None:
        """The client canceled: end the script now; the job becomes CANCELED."""
        self._canceled = True
        self._end(signal.SIGTERM, CANCEL_KILL_AFTER)

    def stop(self, grace: float) -> None:
        """The server is stopping: interrupt, kill after `grace`; the job stays resumable."""
        self._stopping = True
        self._grace = grace
        self._end(signal.SIGINT, grace)

    def _end_as_asked(self) -> None:
        """A cancel or stop that came while the script was being started."""
        if self._canceled:
            self._end(signal.SIGTERM, CANCEL_KILL_AFTER)
        elif self._stopping:
            self._end(signal.SIGINT, self._grace)

    def _end(self, first: signal.Signals, kill_after: float) -> None:
        # `_pid` is cleared once the script is reaped: its number may then belong to another
        # process. (pexpect's isalive() would reap it here, racing the thread that waits.)
        if self._pid is None:
            return
        signal_group(self._pid, first)
        asyncio.get_running_loop().call_later(kill_after, self._kill)

    def _kill(self) -> None:
        if self._pid is not None:
            signal_group(self._pid, signal.SIGKILL)

    # --- the run ----------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        job = self.job
        job.progress = None
        try:
            folders, argv, logfile = await loop.run_in_executor(None, self._prepare_run)
        except ScriptStartError as exc:
            self._start_error = str(exc)
            await self._finish(None, None)
            return
        except OSError as exc:
            self._write_failed(exc, "preparing the run")
            await self._finish(None, None)
            return
        self._logfile = logfile
        env = script_environment(os.environ, self.settings.repository, folders.root / "site")
        try:
            if self._canceled or self._stopping:
                await self._finish(None, folders)
                return
            ended = await self._spawn_and_stream(argv, env, folders, logfile)
        except ScriptStartError as exc:
            self._start_error = str(exc)
            ended = None
        finally:
            self._logfile = None
            with contextlib.suppress(OSError):
                logfile.close()
        try:
            await self._finish(ended, folders)
        finally:
            if self._watcher is not None:
                await self._watcher

    def _prepare_run(self) -> tuple[RunFolders, list[str], BinaryIO]:
        """One trip to a worker thread: the work folder, the argv, the log opened."""
        if not self.store.inputs_present(self.job):
            raise ScriptStartError(
                "the job's input files are missing from its folder; POST it again to restore them"
            )
        folders = self._prepare()
        argv = self._argv(folders)
        return folders, argv, self._open_log(argv)

    def _argv(self, folders: RunFolders) -> list[str]:
        job = self.job
        inputs = self.store.folder(job) / "inputs"
        args = script_arguments(
            job.endpoint,
            job.params,
            self.plan,
            outdir=folders.outdir,
            checkpoint=Path(job.checkpoint),
            init_image=inputs / job.inputs["image"] if job.endpoint == IMAGE_TO_IMAGE else None,
            indir=inputs if job.endpoint == INPAINT_IMAGE else None,
        )
        script = script_path(self.settings.repository, job.endpoint)
        return [str(self.settings.python), str(script), *args]

    def _prepare(self) -> RunFolders:
        """A fresh work folder per run, so the scripts' numbering starts at 00000."""
        root = self.store.fresh_run_dir(self.job)
        outdir = root / "out"
        outdir.mkdir()
        if self.job.endpoint != INPAINT_IMAGE:
            images = outdir / "samples"
            images.mkdir()
            return RunFolders(root, outdir, images, self.settings.repository)
        # inpaint.py opens its config and checkpoint by relative path: give it a working folder
        # that links to the repository's config and to the chosen checkpoint.
        cwd = root / "cwd"
        (cwd / INPAINT_CONFIG.parent).mkdir(parents=True)
        (cwd / INPAINT_CONFIG).symlink_to(self.settings.repository / INPAINT_CONFIG)
        (cwd / INPAINT_CHECKPOINT).symlink_to(Path(self.job.checkpoint))
        site = root / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(sitecustomize_source(self.plan.seed))
        return RunFolders(root, outdir, outdir, cwd)

    def _open_log(self, argv: list[str]) -> BinaryIO:
        path = self.store.log_path(self.job)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            if not is_link_error(exc):
                raise
            path.unlink()  # a link is never the log: never write through one
            fd = os.open(path, flags, 0o644)
        # Unbuffered: a full disk shows at the write that meets it, not at a later flush.
        logfile = os.fdopen(fd, "ab", buffering=0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        header = f"\n=== sd-rest run {self.job.attempts + 1} at {stamp}: {argv!r}\n"
        try:
            logfile.write(header.encode())
        except OSError:
            logfile.close()
            raise
        return logfile

    def _log(self, data: bytes) -> None:
        """Append to job.log; a write the disk refuses stops the run (see _write_failed)."""
        if self._logfile is None or self._fault is not None:
            return
        try:
            self._logfile.write(data)
        except OSError as exc:
            self._write_failed(exc, "writing the job's log")

    def _write_failed(self, exc: OSError, what: str) -> None:
        """The output folder refuses writes (a full disk): nothing the script makes could be
        kept, so it is stopped now and the job fails saying why (the first fault only)."""
        if self._fault is not None:
            return
        self._fault = (exc, what)
        log.warning(
            "job %s/%s: %s failed (%s): stopping its script",
            self.job.endpoint,
            self.job.id,
            what,
            exc.strerror or exc,
        )
        self._end(signal.SIGTERM, CANCEL_KILL_AFTER)

    async def _spawn_and_stream(
        self, argv: list[str], env: dict[str, str], folders: RunFolders, logfile: BinaryIO
    ) -> ScriptExit:
        loop = asyncio.get_running_loop()
        stop_watching = asyncio.Event()
        watcher = self._watcher = asyncio.create_task(
            watch_folder(folders.images, partial(self._publish_ready, folders), stop_watching)
        )
        eof = asyncio.Event()
        try:
            child = pexpect.spawn(
                argv[0],
                argv[1:],
                cwd=str(folders.cwd),
                env=env,
                dimensions=(PTY_ROWS, PTY_COLUMNS),
                echo=False,
                preexec_fn=reset_signals,
            )
        except (pexpect.ExceptionPexpect, OSError) as exc:
            stop_watching.set()
            await watcher
            self._log(f"could not start the script: {exc}\n".encode())
            raise ScriptStartError(f"could not start {argv[0]}: {exc}") from exc
        self._pid = child.pid
        try:
            await self.store.save(
                self.job,
                status=Status.IN_PROGRESS,
                pid=child.pid,
                attempts=self.job.attempts + 1,
                started_at=time.time(),
                error=None,
            )
        except OSError as exc:
            self._write_failed(exc, "recording that the job started")
        self._end_as_asked()  # in case it was asked while we were saving

        def on_readable() -> None:
            try:
                data = os.read(child.child_fd, READ_SIZE)
            except OSError:  # EIO: every process holding the pty's other side has gone
                data = b""
            if not data:
                loop.remove_reader(child.child_fd)
                eof.set()
                return
            self._on_output(data, folders)  # progress first: the log may be refused
            self._log(data)

        loop.add_reader(child.child_fd, on_readable)
        try:
            await eof.wait()
        finally:
            loop.remove_reader(child.child_fd)
        self.parser.finish()
        ended = await loop.run_in_executor(None, self._wait, child)
        self._pid = None
        # Not awaited here: the watcher notices the stop only at its next poll, and the final
        # sweep in _finish publishes whatever it has not seen yet.
        stop_watching.set()
        return ended

    @staticmethod
    def _wait(child: pexpect.spawn) -> ScriptExit:
        with contextlib.suppress(pexpect.ExceptionPexpect):
            child.wait()
        # The script is reaped: pexpect's close() would first sleep 0.1 s (ptyprocess's
        # delayafterclose, which spawn's own attribute of that name does not reach).
        child.ptyproc.delayafterclose = 0
        child.close(force=True)
        return ScriptExit(child.exitstatus, child.signalstatus)

    def _on_output(self, data: bytes, folders: RunFolders) -> None:
        previous = self.parser.progress
        progress = self.parser.feed(data)
        if progress is None:
            return
        self.job.set_progress(*self.plan.progress(progress.batches_done, progress.fraction))
        if previous is not None and progress.batches_done > previous.batches_done:
            # A batch's PNGs are saved before the outer bar moves on: look now, not only when
            # the watcher says so.
            task = asyncio.ensure_future(self._publish_ready(folders))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # --- images -----------------------------------------------------------------------

    async def _publish_ready(self, folders: RunFolders) -> None:
        """Publish, in order, every output file that is complete; stop at the first that is not."""
        async with self._publish_lock:
            loop = asyncio.get_running_loop()
            while self._taken < self.plan.remaining and self._fault is None:
                n = self.plan.image_number(self._taken + 1)
                try:
                    digest = await loop.run_in_executor(
                        None, self._copy_if_complete, folders, self.store.image_path(self.job, n)
                    )
                    if digest is None:
                        return
                    record = ImageRecord(
                        n=n, seed=self.plan.seed, position=self._taken + 1, sha256=digest
                    )
                    await self.store.save(self.job, images=(*self.job.images, record))
                except OSError as exc:
                    self._write_failed(exc, f"publishing image {n}")
                    return
                self._taken += 1

    def _outputs(self, folders: RunFolders) -> list[Path]:
        try:
            names = os.listdir(folders.images)
        except FileNotFoundError:
            return []
        if self.job.endpoint == INPAINT_IMAGE:
            return (
                [folders.images / f"{INPAINT_INPUT_NAME}.png"]
                if f"{INPAINT_INPUT_NAME}.png" in names
                else []
            )
        return [folders.images / name for name in sorted(names) if SAMPLE_RE.match(name)]

    def _copy_if_complete(self, folders: RunFolders, target: Path) -> str | None:
        """Copy the next output file to `target` if it is there and complete (one thread hop
        per image); returns its SHA-256, or None when it is not ready yet."""
        files = self._outputs(folders)
        if self._taken >= len(files):
            return None
        try:
            data = files[self._taken].read_bytes()
        except FileNotFoundError:
            return None
        if not is_complete_png(data):
            return None
        write_atomic(target, data)
        return hashlib.sha256(data).hexdigest()

    # --- outcome ----------------------------------------------------------------------

    async def _finish(self, ended: ScriptExit | None, folders: RunFolders | None) -> None:
        if folders is not None:
            await self._publish_ready(folders)
        job = self.job
        loop = asyncio.get_running_loop()
        if self._stopping and not self._complete and not self._canceled:
            # Left unfinished on purpose: the next start resumes it, and clears the work folder.
            with contextlib.suppress(OSError):  # then the sidecar's pid is checked at start
                await self.store.save(job, pid=None)
            return
        # The work folder (and any image the disk did not let us record) goes before the
        # outcome is visible: a job seen finished has nothing left running or lying around,
        # and a re-POST may start a new run at once. It also gives a full disk its space back.
        await loop.run_in_executor(None, self.store.clear_leftovers, job)
        now = time.time()
        if self._complete:
            await self.store.settle(
                job, status=Status.COMPLETE, pid=None, finished_at=now, error=None
            )
        elif self._canceled:
            await self.store.settle(job, status=Status.CANCELED, pid=None, finished_at=now)
        else:
            await self.store.settle(
                job, status=Status.FAILED, pid=None, finished_at=now, error=self._error(ended)
            )

    @property
    def _complete(self) -> bool:
        return len(self.job.images) >= self.job.total_images

    def _error(self, ended: ScriptExit | None) -> str:
        done = len(self.job.images)
        kept = f"; the {done} image(s) it finished are kept" if done else ""
        if self._fault is not None:
            exc, what = self._fault
            if is_disk_full(exc):
                return (
                    f"the output disk is full ({what}): the script was stopped; free some "
                    f"space and POST the job again{kept}"
                )
            return (
                f"the output folder could not be written ({exc.strerror or exc} while {what}): "
                f"the script was stopped; POST the job again once it can be{kept}"
            )
        if self._start_error or ended is None:
            return self._start_error or "the script could not be started"
        if ended.code == 0:
            return f"the script exited without writing image {done + 1} of {self.job.total_images}"
        line = last_error(self.parser.recent_lines())
        if line and os.strerror(errno.ENOSPC) in line:
            # Its run folder is on the output disk: the script met the full disk first.
            return (
                f"the output disk is full (the script could not write: {line}): free some "
                f"space and POST the job again{kept}"
            )
        return failure_message(ended, line)


class ScriptStartError(Exception):
    """The interpreter could not be started at all."""
