"""Resident workers: long-lived interpreters of the fork's venv that run the scripts as
`__main__`, keeping what is expensive to make between jobs (worker_driver runs inside).

A worker is started like a script (the fork's interpreter, on a pty, cwd the repository, the
scripts' environment): the scripts' output flows through its pty as before, and it talks to
the server over a Unix socket of its own (worker_channel.py; the protocol is in
worker_driver/__init__.py). It sends a heartbeat on that socket every few seconds from a thread
of its own, whatever the script does; the pool (worker_pool.py) kills one silent for too long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sd_rest.runs.exits import ScriptExit
from sd_rest.runs.pty_process import PtyProcess, SpawnError
from sd_rest.runs.worker_channel import Channel, NotReady, Rendezvous
from sd_rest.scripts import script_environment
from sd_rest.settings import Settings

log = logging.getLogger(__name__)

DRIVER: Final = Path(__file__).parent.parent / "worker_driver"  # a folder Python runs by path
MARKER_WAIT: Final = 2.0  # pty output can trail the socket's `finished` by a moment
EXIT_WAIT: Final = 2.0  # an `exit` asked of an idle worker, before SIGTERM
MAX_HEARTBEAT: Final = 2.0  # seconds between a worker's heartbeats, at most

OutputHandler = Callable[[bytes], None]


def heartbeat_interval(timeout: float) -> float:
    """How often a worker beats: several beats within the silence the server tolerates."""
    return min(MAX_HEARTBEAT, timeout / 5)


class WorkerError(Exception):
    """The worker could not be started, or broke the protocol."""


@dataclass(frozen=True)
class Finished:
    """A worker's account of one run (the driver's `finished`), or of its death mid-run."""

    outcome: str  # ok, error, interrupted; "died" when the worker is gone
    exit_code: int | None
    error: str | None = None
    oom: bool = False
    recycle: str | None = None  # why the worker should be replaced after this run
    cache: dict[str, Any] | None = None
    died: ScriptExit | None = None  # how the worker ended, when it died mid-run
    silent: float | None = None  # seconds it had been silent, when killed for it

    @property
    def ended(self) -> ScriptExit:
        """As a script run by hand would have ended."""
        if self.died is not None:
            return self.died
        code = self.exit_code
        if code is not None and code < 0:  # the driver's -N: interrupted by signal N
            return ScriptExit(None, -code)
        return ScriptExit(code)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Finished:
        return cls(
            outcome=str(message.get("outcome")),
            exit_code=message.get("exit_code"),
            error=message.get("error"),
            oom=bool(message.get("oom")),
            recycle=message.get("recycle"),
            cache=message.get("cache"),
        )


@dataclass
class _Run:
    """One run's output, cut from the pty stream at the marker the worker writes after it."""

    job: str
    on_output: OutputHandler
    on_started: Callable[[], None]
    marker: bytes
    finished: asyncio.Future[Finished]
    marker_seen: asyncio.Event = field(default_factory=asyncio.Event)
    pending: bytes = b""  # pty bytes that may be the start of the marker

    def feed(self, data: bytes, note: Callable[[bytes], None]) -> None:
        data = self.pending + data
        self.pending = b""
        end = data.find(self.marker)
        if end >= 0:
            if end:
                self.on_output(data[:end])
            self.marker_seen.set()
            note(data[end + len(self.marker) :])
            return
        keep = _marker_prefix(data, self.marker)
        if keep:
            data, self.pending = data[:-keep], data[-keep:]
        if data:
            self.on_output(data)

    def flush(self) -> None:
        if self.pending:
            self.on_output(self.pending)
        self.pending = b""


def _marker_prefix(data: bytes, marker: bytes) -> int:
    """How many bytes at the end of `data` could be the start of `marker` (held back until the
    next chunk says)."""
    for size in range(min(len(marker) - 1, len(data)), 0, -1):
        if data.endswith(marker[:size]):
            return size
    return 0


class Worker:
    def __init__(
        self, settings: Settings, number: int, on_exit: Callable[[Worker], None] | None = None
    ) -> None:
        self.settings = settings
        self.number = number
        self.pid: int | None = None
        self.jobs = 0
        self.started_at = time.time()
        self.last_used = time.monotonic()
        self.channel: Channel | None = None  # once it is ready
        self.model: dict[str, Any] | None = None  # the last job's cache report
        self.last_outcome: str | None = None  # the last job's
        self.warming = False  # running its warm-up (worker_pool.py)
        self.closing = False  # the pool asked it to end: its exit is expected
        self.silenced: float | None = None  # killed after this many seconds of silence
        self.ended: ScriptExit | None = None
        self.retire: str | None = None  # set: replace this worker once it is free
        self._on_exit = on_exit
        self._process: PtyProcess | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._run: _Run | None = None
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
        loop = asyncio.get_running_loop()
        marker = f"\x1b]sd-rest;end;{job};{secrets.token_hex(4)}\x07"
        run = _Run(job, on_output, on_started, marker.encode(), loop.create_future())
        self._run = run
        self.last_used = time.monotonic()
        try:
            self._send(
                {
                    "op": "run",
                    "job": job,
                    "script": str(script),
                    "argv": argv,
                    "cwd": str(cwd),
                    "seed": seed,
                    "marker": marker,
                }
            )
            finished = await run.finished
            if finished.died is None:
                # Everything the run printed is on its way through the pty: take it all.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(run.marker_seen.wait(), MARKER_WAIT)
        finally:
            run.flush()
            self._run = None
            self.last_used = time.monotonic()
        if counted:
            self.jobs += 1
            self.last_outcome = finished.outcome
            if finished.cache is not None:
                self.model = finished.cache
        if finished.recycle and self.retire is None:
            self.retire = finished.recycle
        if finished.oom and self.retire is None:
            self.retire = "out of memory"
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

    def how_it_ended(self) -> str:
        if self.silenced is not None:
            return f"killed after {self.silenced:.0f} s without a heartbeat (hung or stopped)"
        return self.ended.describe() if self.ended is not None else "unknown"

    # --- the two channels -------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        if self.channel is None:
            raise WorkerError("the worker is not connected")
        self.channel.send(message)

    def _on_message(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        run = self._run
        if event == "started" and run is not None and message.get("job") == run.job:
            run.on_started()
        elif event == "finished" and run is not None and message.get("job") == run.job:
            if not run.finished.done():
                run.finished.set_result(Finished.from_message(message))
        elif event == "fatal":
            log.error("worker %d failed itself: %s", self.number, message.get("error"))
            self.retire = "the worker's driver failed"
        elif event == "error":
            log.warning("worker %d: %s", self.number, message.get("error"))

    async def _watch_pty(self) -> None:
        assert self._process is not None and self._exited is not None
        await self._process.stream(self._on_pty)
        ended = await self._process.wait()
        self.ended = ended
        run = self._run
        if run is not None:
            run.flush()
        if not self._exited.done():
            self._exited.set_result(ended)
        if run is not None and not run.finished.done():
            run.finished.set_result(Finished("died", None, died=ended, silent=self.silenced))
        if self.channel is not None:
            self.channel.close()
        if self._on_exit is not None:
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
