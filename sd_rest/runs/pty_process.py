"""A process on a pseudo-terminal, driven from the event loop.

The scripts' tqdm bars draw for a terminal, and the pty makes the process the leader of a
session and process group that hangs up when its server dies (kill -9 included). pexpect does
the fork; its blocking parts (the fork itself, reaping, closing) run in worker threads so the
event loop never waits on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import pexpect

from sd_rest.runs.exits import ScriptExit
from sd_rest.runs.processes import reset_signals, signal_group
from sd_rest.scripts import PTY_COLUMNS, PTY_ROWS

READ_SIZE = 65536

# Closing a reaped child's pty sleeps (ptyprocess waits 0.1 s for the kernel to update the
# process status): done in a thread, off the run's path, and awaited at shutdown.
_closing: set[asyncio.Future[None]] = set()


class SpawnError(Exception):
    """The program could not be started at all."""


class PtyProcess:
    def __init__(self, child: pexpect.spawn) -> None:
        self._child = child
        self.pid: int = child.pid
        self._reaped = False

    @classmethod
    async def spawn(cls, argv: list[str], env: Mapping[str, str], cwd: Path) -> PtyProcess:
        start = partial(
            pexpect.spawn,
            argv[0],
            argv[1:],
            cwd=str(cwd),
            env=dict(env),
            dimensions=(PTY_ROWS, PTY_COLUMNS),
            echo=False,
            preexec_fn=reset_signals,
        )
        try:
            child = await asyncio.get_running_loop().run_in_executor(None, start)
        except (pexpect.ExceptionPexpect, OSError) as exc:
            raise SpawnError(f"could not start {argv[0]}: {exc}") from exc
        return cls(child)

    @property
    def fd(self) -> int:
        return int(self._child.child_fd)

    async def stream(self, on_data: Callable[[bytes], None]) -> None:
        """Call `on_data` with each chunk of output until every process holding the pty's
        other side has closed it."""
        loop = asyncio.get_running_loop()
        eof = asyncio.Event()
        fd = self.fd

        def readable() -> None:
            try:
                data = os.read(fd, READ_SIZE)
            except OSError:  # EIO: the other side is gone
                data = b""
            if not data:
                loop.remove_reader(fd)
                eof.set()
                return
            on_data(data)

        loop.add_reader(fd, readable)
        try:
            await eof.wait()
        finally:
            loop.remove_reader(fd)

    def signal(self, sig: signal.Signals) -> None:
        """Signal the process group the process leads (the pty made it a session leader).
        Nothing once it is reaped: its number may belong to another process by then."""
        if not self._reaped:
            signal_group(self.pid, sig)

    async def wait(self) -> ScriptExit:
        """Reap the process; its exit code, or the signal that ended it."""
        loop = asyncio.get_running_loop()
        ended = await loop.run_in_executor(None, self._reap)
        self._reaped = True
        closing = loop.run_in_executor(None, self._child.close, True)
        _closing.add(closing)
        closing.add_done_callback(_closing.discard)
        return ended

    def _reap(self) -> ScriptExit:
        with contextlib.suppress(pexpect.ExceptionPexpect):
            self._child.wait()
        # pexpect reads the status only when asked: isalive() after wait() fills it in.
        with contextlib.suppress(pexpect.ExceptionPexpect):
            self._child.isalive()
        return ScriptExit(self._child.exitstatus, self._child.signalstatus)


async def closed() -> None:
    """Wait for every pty still being closed (at shutdown)."""
    if _closing:
        await asyncio.gather(*_closing, return_exceptions=True)
