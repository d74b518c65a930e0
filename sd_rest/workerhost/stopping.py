"""SIGTERM and SIGINT for the whole life of a worker host, set up before its slow start-up
steps (reaching Redis, hashing the checkpoints: a first start reads 4 GB files).

- While it starts, a signal cuts the start short (StopRequested, raised where the main thread
  waits); the command line says so in one line and exits 0, its scratch folder cleared.
- While it makes the host (threads, the resident worker's warm-up starting), a signal is kept:
  the host stops as soon as it is made, before taking any job.
- While it serves, a signal starts the graceful stop (host.py).
- A second signal while stopping exits at once, in one line: the running jobs are not given
  back (they run again elsewhere after the heartbeat timeout, as after a crash), the resident
  worker and the scripts end with it (their pipe and pty close).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType


class StopRequested(BaseException):
    """A signal came while the host started. A BaseException, like KeyboardInterrupt: no
    `except Exception` on the way may take it for a failure and carry on."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame


class Signals:
    def __init__(self, prog: str) -> None:
        self.prog = prog
        self.requested = threading.Event()
        self._cut_short = True  # starting: a signal raises StopRequested

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def keep(self) -> None:
        """From now on a (first) signal only sets `requested`: the host is being made, or
        serves."""
        self._cut_short = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested.is_set():
            line = (
                f"{self.prog}: {name} again while stopping: exiting now; the jobs it ran "
                "run again on another host after --heartbeat-timeout\n"
            )
            os.write(2, line.encode())
            os._exit(128 + signum)
        self.requested.set()
        if self._cut_short:
            raise StopRequested(name)
