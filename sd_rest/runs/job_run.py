"""What every runner does around a script run: the run's workspace, progress parsed from the
script's output, images published as they come, a full disk noticed, cancel and stop, and the
outcome in words a client can act on. Runners differ only in how the script is run
(`JobRun._execute`) and ended (`JobRun._end`)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from sd_rest.endpoints import ENDPOINTS
from sd_rest.runs.exits import ScriptExit, failure_message
from sd_rest.runs.labels import ImageLabeler, describe_run
from sd_rest.runs.progress import ProgressParser, last_error
from sd_rest.runs.provenance import provenance_for
from sd_rest.runs.publisher import ImagePublisher
from sd_rest.runs.seam import Outcome, OutcomeKind, RunSink
from sd_rest.runs.workspace import InputsMissing, Workspace
from sd_rest.scripts import plan_run
from sd_rest.settings import Settings
from sd_rest.state.disk import is_disk_full
from sd_rest.state.jobs import Job
from sd_rest.state.store import JobStore

log = logging.getLogger(__name__)

CANCEL_KILL_AFTER = 0.5  # seconds between asking a script to end and killing it, on a cancel


class JobRun(ABC):
    def __init__(self, settings: Settings, store: JobStore, job: Job, sink: RunSink) -> None:
        self.settings = settings
        self.store = store
        self.job = job
        self.sink = sink
        self.plan = plan_run(job.params, job.total_images, len(job.images))
        self.parser = ProgressParser()
        self._canceled = False
        self._stopping = False
        self._grace = settings.shutdown_grace
        self._kills: list[asyncio.TimerHandle] = []
        # The first write to the output folder that failed (a full disk), and what it was.
        self._fault: tuple[OSError, str] | None = None

    # --- control ----------------------------------------------------------------------

    def cancel(self) -> None:
        self._canceled = True
        self._end(signal.SIGTERM, CANCEL_KILL_AFTER)

    def stop(self, grace: float) -> None:
        self._stopping = True
        self._grace = grace
        self._end(signal.SIGINT, grace)

    def _end_as_asked(self) -> None:
        """A cancel or stop that came while the script was being started."""
        if self._canceled:
            self._end(signal.SIGTERM, CANCEL_KILL_AFTER)
        elif self._stopping:
            self._end(signal.SIGINT, self._grace)

    @abstractmethod
    def _end(self, first: signal.Signals, kill_after: float) -> None:
        """Ask the running script to end with `first`, and make sure it has ended `kill_after`
        seconds later. Nothing when no script runs yet (see `_end_as_asked`)."""

    def _kill_later(self, delay: float, kill: Callable[[], object]) -> None:
        self._kills.append(asyncio.get_running_loop().call_later(delay, kill))

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

    # --- the run ----------------------------------------------------------------------

    async def run(self) -> Outcome:
        loop = asyncio.get_running_loop()
        self.job.progress = None
        try:
            workspace = await loop.run_in_executor(
                None, Workspace.create, self.settings, self.store, self.job, self.plan,
                self._write_failed,
            )  # fmt: skip
        except InputsMissing as exc:
            return await self._finish(str(exc))
        except OSError as exc:
            self._write_failed(exc, "preparing the run")
            return await self._finish(None)
        if self._canceled or self._stopping:
            workspace.log.close()
            return await self._finish(None)
        publisher = ImagePublisher(
            ENDPOINTS[self.job.endpoint],
            workspace.folders,
            self.plan,
            lambda n: self.store.layout.image(self.job.endpoint, self.job.id, n),
            self.sink,
            self._write_failed,
            self._labeler(),
        )
        publisher.start()
        try:
            ended = await self._execute(workspace, publisher)
            self.parser.finish()
        finally:
            workspace.log.close()
            await publisher.close()
            for kill in self._kills:
                kill.cancel()
        return await self._finish(ended)

    def _labeler(self) -> ImageLabeler | None:
        """What adds each image's metadata; None (images go without it) if it cannot be made:
        metadata never stops a run."""
        try:
            provenance = provenance_for(self.settings.output, self.settings.repository)
            run = describe_run(self.job, self.plan)
        except Exception:
            log.exception("job %s/%s: no metadata for its images", self.job.endpoint, self.job.id)
            return None
        return ImageLabeler(run, Path(self.job.checkpoint), provenance)

    @abstractmethod
    async def _execute(self, workspace: Workspace, publisher: ImagePublisher) -> ScriptExit | str:
        """Run the script: how it ended, or why it could not be started. Reports the start
        (`_started`) and feeds the output to `_output`."""

    async def _started(self, pid: int | None) -> None:
        try:
            await self.sink.started(pid)
        except OSError as exc:
            self._write_failed(exc, "recording that the job started")
        self._end_as_asked()  # in case it was asked while the script was starting

    def _output(self, data: bytes, workspace: Workspace, publisher: ImagePublisher) -> None:
        # Progress first: the log may be refused (a full disk).
        previous = self.parser.progress
        progress = self.parser.feed(data)
        if progress is not None:
            self.sink.progress(*self.plan.progress(progress.batches_done, progress.fraction))
            if previous is not None and progress.batches_done > previous.batches_done:
                publisher.look_now()  # a batch's PNGs are saved before the bar moves on
        workspace.log.write(data)

    async def _finish(self, ended: ScriptExit | str | None) -> Outcome:
        """The outcome, once nothing of the run is left. `ended`: how the script ended, why
        the run could not start, or None when no script ran."""
        job = self.job
        complete = len(job.images) >= job.total_images
        if self._stopping and not complete and not self._canceled:
            return Outcome(OutcomeKind.STOPPED)  # the next start resumes it and clears its folder
        # The work folder (and any image the disk did not let us record) goes before the
        # outcome is visible: a job seen finished has nothing left running or lying around,
        # and a re-POST may start a new run at once. It also gives a full disk its space back.
        await asyncio.get_running_loop().run_in_executor(None, self.store.clear_leftovers, job)
        if complete:
            return Outcome(OutcomeKind.COMPLETE)
        if self._canceled:
            return Outcome(OutcomeKind.CANCELED)
        return Outcome.failed(self._error(ended))

    def _error(self, ended: ScriptExit | str | None) -> str:
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
        if isinstance(ended, str):
            return ended
        if ended is None:
            return "the script could not be started"
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
