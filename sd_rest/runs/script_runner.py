"""The first runner: one fresh process of the fork's interpreter per job, on a pty, running the
job's script with its flags (today's way, and the way a user runs a script by hand)."""

from __future__ import annotations

import signal

from sd_rest.runs.exits import ScriptExit
from sd_rest.runs.job_run import JobRun
from sd_rest.runs.pty_process import PtyProcess, SpawnError
from sd_rest.runs.publisher import ImagePublisher
from sd_rest.runs.workspace import Workspace


class ScriptRunner(JobRun):
    _process: PtyProcess | None = None

    def _end(self, first: signal.Signals, kill_after: float) -> None:
        process = self._process
        if process is None:
            return
        process.signal(first)
        self._kill_later(kill_after, lambda: process.signal(signal.SIGKILL))

    async def _execute(self, workspace: Workspace, publisher: ImagePublisher) -> ScriptExit | str:
        try:
            process = await PtyProcess.spawn(workspace.argv, workspace.env, workspace.folders.cwd)
        except SpawnError as exc:
            workspace.log.write(f"could not start the script: {exc}\n".encode())
            return str(exc)
        self._process = process
        await self._started(process.pid)
        await process.stream(lambda data: self._output(data, workspace, publisher))
        ended = await process.wait()
        self._process = None
        return ended
