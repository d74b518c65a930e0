"""One run on a resident worker (workers.py), the server's side: the `run` request, the run's
output cut from the worker's pty stream at the marker the worker writes after it, the driver's
`started` and `finished` for it, and its account (`Finished`), or the worker's death mid-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sd_rest.runs.exits import ScriptExit

MARKER_WAIT: Final = 2.0  # pty output can trail the socket's `finished` by a moment

OutputHandler = Callable[[bytes], None]


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

    @property
    def advice(self) -> str | None:
        """Why the worker should be replaced after this run, if it should."""
        return self.recycle or ("out of memory" if self.oom else None)

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
class WorkerRun:
    """One run's output, cut from the pty stream at the marker the worker writes after it, and
    its end."""

    job: str
    on_output: OutputHandler
    on_started: Callable[[], None]
    marker: bytes
    finished: asyncio.Future[Finished]
    marker_seen: asyncio.Event = field(default_factory=asyncio.Event)
    pending: bytes = b""  # pty bytes that may be the start of the marker

    @classmethod
    def begin(cls, job: str, on_output: OutputHandler, on_started: Callable[[], None]) -> WorkerRun:
        # Random, so that no output of the script can end its run early.
        marker = f"\x1b]sd-rest;end;{job};{secrets.token_hex(4)}\x07"
        future = asyncio.get_running_loop().create_future()
        return cls(job, on_output, on_started, marker.encode(), future)

    def request(self, script: Path, argv: list[str], cwd: Path, seed: int | None) -> dict[str, Any]:
        """The `run` message that starts it."""
        return {
            "op": "run",
            "job": self.job,
            "script": str(script),
            "argv": argv,
            "cwd": str(cwd),
            "seed": seed,
            "marker": self.marker.decode(),
        }

    async def account(self) -> Finished:
        """The worker's account, once it is done and idle again, or dead."""
        finished = await self.finished
        if finished.died is None:
            # Everything the run printed is on its way through the pty: take it all.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.marker_seen.wait(), MARKER_WAIT)
        return finished

    def on_event(self, message: dict[str, Any]) -> None:
        """The driver's `started` and `finished` (those of this run only)."""
        if message.get("job") != self.job:
            return
        event = message.get("event")
        if event == "started":
            self.on_started()
        elif event == "finished" and not self.finished.done():
            self.finished.set_result(Finished.from_message(message))

    def died(self, ended: ScriptExit, silent: float | None) -> None:
        """The worker ended before its `finished`."""
        if not self.finished.done():
            self.finished.set_result(Finished("died", None, died=ended, silent=silent))

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
