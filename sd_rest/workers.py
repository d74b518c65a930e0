"""Resident workers: long-lived interpreters of the fork's venv that run the scripts as
`__main__`, keeping what is expensive to make between jobs (worker_driver.py runs inside).

A worker is started like a script (the fork's interpreter, on a pty, cwd the repository, the
scripts' environment): the scripts' output flows through its pty as before, and it talks to
the server over a Unix socket of its own (JSON lines; the protocol is in worker_driver.py).
The pool keeps one per running job at most, and replaces them: after a number of jobs, after
an idle time (so unified memory goes back to macOS), when one advises it (out of memory, an
import cut short) or dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .exits import ScriptExit
from .processes import rss_of
from .pty_process import PtyProcess, SpawnError
from .scripts import script_environment
from .settings import Settings

log = logging.getLogger(__name__)

DRIVER: Final = Path(__file__).with_name("worker_driver")  # a folder Python runs by path
SOCKET_ENV: Final = "SD_REST_WORKER_SOCKET"
TOKEN_ENV: Final = "SD_REST_WORKER_TOKEN"
READY_TIMEOUT: Final = 60.0  # the driver connects before importing anything heavy
MARKER_WAIT: Final = 2.0  # pty output can trail the socket's `finished` by a moment
EXIT_WAIT: Final = 2.0  # an `exit` asked of an idle worker, before SIGTERM
REAP_EVERY: Final = 5.0  # seconds between checks for idle workers to retire

OutputHandler = Callable[[bytes], None]


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
    job: str
    on_output: OutputHandler
    on_started: Callable[[], None]
    marker: bytes
    finished: asyncio.Future[Finished]
    marker_seen: asyncio.Event = field(default_factory=asyncio.Event)


class Worker:
    def __init__(self, settings: Settings, number: int) -> None:
        self.settings = settings
        self.number = number
        self.pid: int | None = None
        self.jobs = 0
        self.started_at = time.time()
        self.last_used = time.monotonic()
        self.model: dict[str, Any] | None = None  # the last run's cache report
        self._process: PtyProcess | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._run: _Run | None = None
        self._pending = b""  # pty bytes that may be the start of the run's marker
        self._status: asyncio.Future[dict[str, Any]] | None = None
        self._exited: asyncio.Future[ScriptExit] | None = None
        self.retire: str | None = None  # set: replace this worker once it is free

    @property
    def busy(self) -> bool:
        return self._run is not None

    @property
    def alive(self) -> bool:
        return self._exited is not None and not self._exited.done()

    # --- start ------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        folder = Path(tempfile.mkdtemp(prefix="sd-rest-worker-"))  # 0700: ours alone
        path = folder / "control.sock"
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listening.bind(str(path))
            listening.listen(1)
            listening.setblocking(False)
            token = secrets.token_hex(16)
            env = script_environment(os.environ, self.settings.repository)
            env.update({SOCKET_ENV: str(path), TOKEN_ENV: token})
            argv = [str(self.settings.python), str(DRIVER)]
            try:
                self._process = await PtyProcess.spawn(argv, env, self.settings.repository)
            except SpawnError as exc:
                raise WorkerError(str(exc)) from exc
            self.pid = self._process.pid
            self._exited = loop.create_future()
            self._tasks.append(loop.create_task(self._watch_pty()))
            try:
                connection = await asyncio.wait_for(self._accept(listening), READY_TIMEOUT)
                reader, self._writer = await asyncio.open_connection(sock=connection)
                ready = json.loads(await asyncio.wait_for(reader.readline(), READY_TIMEOUT))
            except (asyncio.TimeoutError, OSError, ValueError) as exc:
                await self.kill()
                raise WorkerError(f"the worker did not start: {exc or type(exc).__name__}") from exc
        finally:
            listening.close()
            shutil.rmtree(folder, ignore_errors=True)
        if ready.get("event") != "ready" or not secrets.compare_digest(
            str(ready.get("token")), token
        ):
            await self.kill()
            raise WorkerError("the worker's first message was not its ready with our token")
        self._tasks.append(loop.create_task(self._read_control(reader)))
        log.info(
            "worker %d started (pid %d, Python %s)", self.number, self.pid, ready.get("python")
        )

    async def _accept(self, listening: socket.socket) -> socket.socket:
        """The worker's connection; WorkerError if the worker ends before it connects."""
        loop = asyncio.get_running_loop()
        accepting = loop.create_task(loop.sock_accept(listening))
        assert self._exited is not None
        done, _ = await asyncio.wait({accepting, self._exited}, return_when=asyncio.FIRST_COMPLETED)
        if accepting not in done:
            accepting.cancel()
            raise OSError(f"it exited first ({self._exited.result().describe()})")
        connection, _ = accepting.result()
        return connection

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
    ) -> Finished:
        """Run one script as `__main__`; its output goes to `on_output` as it comes, and
        `on_started` is called when the worker begins it (from then on an interrupt reaches
        the script; before, the worker ignores one). Returns when the worker says it is done
        and idle again, or when it dies."""
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
            self._flush_pending()
            self._run = None
            self.last_used = time.monotonic()
        self.jobs += 1
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
        """SIGKILL to the worker's process group (the pty made it its leader)."""
        if self._process is not None and self.alive:
            self._process.signal(signal.SIGKILL)

    async def kill(self) -> None:
        """End the worker now, and wait until it is reaped."""
        self.signal_kill()
        await self._reaped()

    async def close(self) -> None:
        """Ask an idle worker to leave; SIGTERM, then SIGKILL, if it does not."""
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
        if self._writer is not None:
            self._writer.close()

    async def status(self, timeout: float = 0.5) -> dict[str, Any]:
        """The worker's own account: busy, jobs, RSS, its resident model (answered even while a
        job runs); what the server knows when it does not answer in time."""
        known = {
            "worker": self.number,
            "pid": self.pid,
            "state": "busy" if self.busy else "idle",
            "jobs": self.jobs,
            "model": self.model,
            "rss": rss_of(self.pid) if self.pid else None,
        }
        if not self.alive:
            return known
        loop = asyncio.get_running_loop()
        if self._status is None or self._status.done():
            self._status = loop.create_future()
            try:
                self._send({"op": "status"})
            except (OSError, WorkerError):
                return known
        try:
            answer = await asyncio.wait_for(asyncio.shield(self._status), timeout)
        except asyncio.TimeoutError:
            return known
        return {**known, "rss": answer.get("rss", known["rss"]), "models": answer.get("models")}

    # --- the two channels -------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        if self._writer is None or self._writer.is_closing():
            raise WorkerError("the worker's channel is closed")
        self._writer.write(json.dumps(message).encode() + b"\n")

    async def _read_control(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (OSError, ValueError):
                line = b""
            if not line:
                return  # the worker is gone: _watch_pty settles the run with how it ended
            try:
                message = json.loads(line)
            except ValueError:
                log.warning("worker %d sent a bad line: %r", self.number, line[:200])
                continue
            self._on_message(message)

    def _on_message(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        run = self._run
        if event == "started" and run is not None and message.get("job") == run.job:
            run.on_started()
        elif event == "finished" and run is not None and message.get("job") == run.job:
            if not run.finished.done():
                run.finished.set_result(Finished.from_message(message))
        elif event == "status":
            if self._status is not None and not self._status.done():
                self._status.set_result(message)
        elif event == "fatal":
            log.error("worker %d failed itself: %s", self.number, message.get("error"))
            self.retire = "the worker's driver failed"
        elif event == "error":
            log.warning("worker %d: %s", self.number, message.get("error"))

    async def _watch_pty(self) -> None:
        assert self._process is not None and self._exited is not None
        await self._process.stream(self._on_pty)
        ended = await self._process.wait()
        self._flush_pending()
        if not self._exited.done():
            self._exited.set_result(ended)
        run = self._run
        if run is not None and not run.finished.done():
            run.finished.set_result(Finished("died", None, died=ended))
        if self._writer is not None:
            self._writer.close()

    def _on_pty(self, data: bytes) -> None:
        run = self._run
        if run is None:
            if data.strip():
                log.debug("worker %d between jobs: %r", self.number, data[:200])
            return
        data = self._pending + data
        self._pending = b""
        end = data.find(run.marker)
        if end >= 0:
            if end:
                run.on_output(data[:end])
            run.marker_seen.set()
            rest = data[end + len(run.marker) :]
            if rest.strip():
                log.debug("worker %d after its job: %r", self.number, rest[:200])
            return
        keep = _marker_prefix(data, run.marker)
        if keep:
            data, self._pending = data[:-keep], data[-keep:]
        if data:
            run.on_output(data)

    def _flush_pending(self) -> None:
        if self._pending and self._run is not None:
            self._run.on_output(self._pending)
        self._pending = b""


def _marker_prefix(data: bytes, marker: bytes) -> int:
    """How many bytes at the end of `data` could be the start of `marker` (held back until the
    next chunk says)."""
    for size in range(min(len(marker) - 1, len(data)), 0, -1):
        if data.endswith(marker[:size]):
            return size
    return 0


class WorkerPool:
    """At most one worker per running job: started when a job needs one, reused while it
    lasts, replaced when it should be."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._idle: list[Worker] = []
        self._busy: set[Worker] = set()
        self._numbers = 0
        self._closing: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False

    async def acquire(self) -> Worker:
        """A live idle worker, or a new one (WorkerError if it cannot start)."""
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._retire_idle())
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                self._busy.add(worker)
                return worker
            self._dispose(worker)
        self._numbers += 1
        worker = Worker(self.settings, self._numbers)
        self._busy.add(worker)
        try:
            await worker.start()
        except BaseException:
            self._busy.discard(worker)
            raise
        return worker

    def release(self, worker: Worker) -> None:
        """Back to the pool after a run; or replaced, when it should be."""
        self._busy.discard(worker)
        if worker.alive and worker.jobs >= self.settings.worker_max_jobs:
            worker.retire = worker.retire or f"it has served {worker.jobs} jobs"
        if self._closed or not worker.alive or worker.retire:
            if worker.retire:
                log.info("replacing worker %d: %s", worker.number, worker.retire)
            self._dispose(worker)
        else:
            self._idle.append(worker)

    def _dispose(self, worker: Worker) -> None:
        task = asyncio.get_running_loop().create_task(worker.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _retire_idle(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY)
            limit = self.settings.worker_idle_seconds
            for worker in list(self._idle):
                if time.monotonic() - worker.last_used > limit:
                    self._idle.remove(worker)
                    log.info(
                        "worker %d idle for %.0f s: giving its memory back", worker.number, limit
                    )
                    self._dispose(worker)

    async def describe(self) -> list[dict[str, Any]]:
        workers = sorted([*self._busy, *self._idle], key=lambda w: w.number)
        return list(await asyncio.gather(*(worker.status() for worker in workers)))

    async def close(self) -> None:
        """At shutdown: every worker ended (busy ones were interrupted by their runners)."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for worker in [*self._idle, *self._busy]:
            self._dispose(worker)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
