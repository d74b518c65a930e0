"""Resident workers: long-lived interpreters of the fork's venv that run the scripts as
`__main__`, keeping what is expensive to make between jobs (worker_driver runs inside).

A worker is started like a script (the fork's interpreter, on a pty, cwd the repository, the
scripts' environment): the scripts' output flows through its pty as before, and it talks to
the server over a Unix socket of its own (worker_channel.py; the protocol is in
worker_driver/__init__.py). It sends a heartbeat on that socket every few seconds from a thread
of its own, whatever the script does; the pool (worker_pool.py) kills one silent for too long.
One run's side of it (the request, the output cut at the run's end, the account) is in
worker_run.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from sd_rest.runs.exits import ScriptExit
from sd_rest.runs.pty_process import PtyProcess, SpawnError
from sd_rest.runs.worker_channel import Channel, NotReady, Rendezvous
from sd_rest.runs.worker_run import Finished, OutputHandler, WorkerRun
from sd_rest.scripts import script_environment
from sd_rest.settings import Settings

log = logging.getLogger(__name__)

DRIVER: Final = Path(__file__).parent.parent / "worker_driver"  # a folder Python runs by path
EXIT_WAIT: Final = 2.0  # an `exit` asked of an idle worker, before SIGTERM
MAX_HEARTBEAT: Final = 2.0  # seconds between a worker's heartbeats, at most


def heartbeat_interval(timeout: float) -> float:
    """How often a worker beats: several beats within the silence the server tolerates."""
    return min(MAX_HEARTBEAT, timeout / 5)


class WorkerError(Exception):
    """The worker could not be started, or broke the protocol."""


class Worker:
    def __init__(self, settings: Settings, number: int, on_exit: Callable[[Worker], None]) -> None:
        self.settings = settings
        self.number = number
        self.pid: int | None = None
        self.jobs = 0
        self.last_used = time.monotonic()
        self.channel: Channel | None = None  # once it is ready
        self.model: dict[str, Any] | None = None  # the last job's cache report
        self.last_outcome: str | None = None  # the last job's
        self.closing = False  # the pool asked it to end: its exit is expected
        self.silenced: float | None = None  # killed after this many seconds of silence
        self.retire: str | None = None  # set: replace this worker once it is free
        self._on_exit = on_exit
        self._process: PtyProcess | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._run: WorkerRun | None = None
        self._exited: asyncio.Future[ScriptExit] | None = None

    @property
    def busy(self) -> bool:
        return self._run is not None

    @property
    def alive(self) -> bool:
        return self._exited is not None and not self._exited.done()

    @property
    def gone(self) -> bool:
        """Its process was started and has ended."""
        return self._exited is not None and self._exited.done()

    @property
    def ended(self) -> ScriptExit | None:
        """How its process ended, once it has."""
        return self._exited.result() if self._exited is not None and self._exited.done() else None

    # --- start ------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        rendezvous = Rendezvous()
        try:
            env = script_environment(os.environ, self.settings.repository)
            env.update(rendezvous.environment(heartbeat_interval(self.settings.worker_timeout)))
            argv = [str(self.settings.python), str(DRIVER)]
            try:
                self._process = await PtyProcess.spawn(argv, env, self.settings.repository)
            except SpawnError as exc:
                raise WorkerError(str(exc)) from exc
            self.pid = self._process.pid
            self._exited = loop.create_future()
            self._tasks.append(loop.create_task(self._watch_pty()))
            try:
                reader, writer, ready = await rendezvous.meet(self._exited)
            except NotReady as exc:
                self.closing = True  # its job says why: not listed as gone
                await self.kill()
                raise WorkerError(str(exc)) from exc
        finally:
            rendezvous.close()
        self.channel = Channel(self.number, reader, writer, self._on_message)
        self._tasks.append(loop.create_task(self.channel.read()))
        log.info(
            "worker %d started (pid %d, Python %s)", self.number, self.pid, ready.get("python")
        )

    # --- a run ------------------------------------------------------------------------

    async def run(
        self,
        job: str,
        script: Path,
        argv: list[str],
        cwd: Path,
        seed: int | None,
        on_output: OutputHandler,
        on_started: Callable[[], None],
        counted: bool = True,
    ) -> Finished:
        """Run one script as `__main__`; its output goes to `on_output` as it comes, and
        `on_started` is called when the worker begins it (from then on an interrupt reaches
        the script; before, the worker ignores one). Returns when the worker says it is done
        and idle again, or when it dies. `counted`: a job (a warm-up is not one)."""
        if self._run is not None:
            raise WorkerError("the worker is busy")
        run = self._run = WorkerRun.begin(job, on_output, on_started)
        self.last_used = time.monotonic()
        try:
            # A worker that died since it was acquired has its channel closed: its run is
            # settled as died (and retried), by its pty watcher, or here if that saw no run.
            with contextlib.suppress(OSError):
                self._send(run.request(script, argv, cwd, seed))
            if self.ended is not None:
                run.died(self.ended, self.silenced)
            finished = await run.account()
        finally:
            run.flush()
            self._run = None
            self.last_used = time.monotonic()
        if counted:
            self.jobs += 1
            self.last_outcome = finished.outcome
            if finished.cache is not None:
                self.model = finished.cache
        if self.retire is None:
            self.retire = finished.advice
        return finished

    def interrupt(self) -> None:
        """SIGINT to the worker alone: a KeyboardInterrupt in the running script."""
        if self.pid is not None and self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGINT)

    def signal_kill(self) -> None:
        """SIGKILL to the worker's process group (the pty made it its leader); a stopped
        process dies of it too."""
        if self._process is not None and self.alive:
            self._process.signal(signal.SIGKILL)

    def end_now(self) -> None:
        """SIGKILL, expected: a run that would not end when asked."""
        self.closing = True
        self.signal_kill()

    async def kill(self) -> None:
        """End the worker now, and wait until it is reaped."""
        self.signal_kill()
        await self._reaped()

    async def close(self) -> None:
        """Ask an idle worker to leave; SIGTERM, then SIGKILL, if it does not."""
        self.closing = True
        if self.alive:
            with contextlib.suppress(OSError, WorkerError):
                self._send({"op": "exit"})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reaped()), EXIT_WAIT)
        if self.alive and self._process is not None:
            self._process.signal(signal.SIGTERM)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reaped()), EXIT_WAIT)
        await self.kill()

    async def _reaped(self) -> None:
        if self._exited is not None:
            await asyncio.shield(self._exited)
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.gather(
            *(t for t in self._tasks if t is not asyncio.current_task()), return_exceptions=True
        )
        if self.channel is not None:
            self.channel.close()

    # --- the two channels -------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        if self.channel is None:
            raise WorkerError("the worker is not connected")
        self.channel.send(message)

    def _on_message(self, message: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.on_event(message)
        event = message.get("event")
        if event == "fatal":
            log.error("worker %d failed itself: %s", self.number, message.get("error"))
            self.retire = "the worker's driver failed"
        elif event == "error":
            log.warning("worker %d: %s", self.number, message.get("error"))

    async def _watch_pty(self) -> None:
        assert self._process is not None and self._exited is not None
        await self._process.stream(self._on_pty)
        ended = await self._process.wait()
        run = self._run
        if run is not None:
            run.flush()
        if not self._exited.done():
            self._exited.set_result(ended)
        if run is not None:
            run.died(ended, self.silenced)
        if self.channel is not None:
            self.channel.close()
        self._on_exit(self)

    def _on_pty(self, data: bytes) -> None:
        run = self._run
        if run is None:
            if data.strip():
                log.debug("worker %d between jobs: %r", self.number, data[:200])
            return
        run.feed(data, self._after_run)

    def _after_run(self, rest: bytes) -> None:
        if rest.strip():
            log.debug("worker %d after its job: %r", self.number, rest[:200])
