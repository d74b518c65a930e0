"""How a script run ended, in words a client can act on. Pure."""

from __future__ import annotations

import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class ScriptExit:
    """A reaped script: its exit code, or the signal that ended it."""

    code: int | None
    signal: int | None = None

    def describe(self) -> str:
        if self.signal is not None:
            if self.signal == signal.SIGKILL:
                return (
                    "the script was killed by SIGKILL: out of memory? The system kills a "
                    "process that runs out of memory"
                )
            return f"the script was ended by signal {_signal_name(self.signal)}"
        return f"the script exited with status {self.code}"


def _signal_name(number: int) -> str:
    try:
        return f"{signal.Signals(number).name} ({number})"
    except ValueError:
        return str(number)


def failure_message(ended: ScriptExit, error_line: str | None) -> str:
    """The `error` of a FAILED job whose script failed: its last error line, if it printed
    one, and always how it ended, so a silent death is never explained by an ordinary line."""
    if error_line:
        return f"{error_line} ({ended.describe()})"
    if ended.signal is None:
        return f"{ended.describe()} without printing an error"
    return ended.describe()
