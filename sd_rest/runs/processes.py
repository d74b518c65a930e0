"""Finding and ending script processes: ours only, and always the whole process group."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

ORPHAN_WAIT = 5.0  # seconds to wait for a killed orphan to be gone
# Where Linux shows processes; without it (macOS) `ps` is asked. A test points it elsewhere to
# run the `ps` way on Linux.
PROC = Path("/proc")
# Signals a script must not inherit as ignored: a server started under `nohup` (SIGHUP) or
# in the background of a non-interactive shell (SIGINT) passes its ignored signals on through
# exec, and then neither the pty hang-up nor our interrupt would end the script.
RESET_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGPIPE)


def _proc_available() -> bool:
    return (PROC / "self" / "stat").exists()


def command_line(pid: int) -> str | None:
    """The process's command line, or None when it is gone (Linux /proc, else `ps` on macOS).
    A zombie has an empty command line."""
    if _proc_available():
        try:
            return (
                (PROC / str(pid) / "cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
            )
        except OSError:
            return None
    listed = _ps(pid, "stat=", "command=")
    if listed is None:
        return None
    state, _, command = listed.partition(" ")
    # As /proc has it: ps shows a zombie's name (`[name] <defunct>`), which is no command line.
    return "" if state.startswith("Z") else command.strip()


def is_running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie has ended: it only waits to be reaped)."""
    if _proc_available():
        try:
            stat = (PROC / str(pid) / "stat").read_text(errors="replace")
        except OSError:
            return False
        # The state follows the command name, which is in parentheses and may hold any byte.
        return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] not in ("Z", "X", "")
    state = _ps(pid, "stat=")
    return bool(state) and not state.startswith("Z")


def _ps(pid: int, *columns: str) -> str | None:
    # -ww: never cut a line to the width of a terminal, or of COLUMNS when it is set (procps
    # does): the markers end_orphan looks for are at the end of long command lines.
    options = [arg for column in columns for arg in ("-o", column)]
    try:
        result = subprocess.run(
            ["ps", "-ww", "-p", str(pid), *options],
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def signal_group(pid: int, sig: signal.Signals) -> bool:
    """Signal the process group the script leads (the pty made it a session leader)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def is_our_script(pid: int, markers: tuple[str, ...]) -> bool:
    """Whether `pid` runs with every one of `markers` in its command line. A recorded pid may
    have been reused by an unrelated process since; the job's own run folder and the script's
    path, both in our scripts' argv, tell ours apart."""
    cmd = command_line(pid)
    return bool(cmd) and all(marker in cmd for marker in markers)


def end_orphan(pid: int, markers: tuple[str, ...], wait: float = ORPHAN_WAIT) -> bool:
    """Kill a script left running by a previous server, only if it is ours (see
    `is_our_script`), and wait until it is gone, so that it cannot write into a run folder
    that is being cleared. Returns whether it was killed."""
    if pid <= 1 or pid == os.getpid() or not is_our_script(pid, markers):
        return False
    if not signal_group(pid, signal.SIGKILL):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return False
    deadline = time.monotonic() + wait
    while is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return True


def reset_signals() -> None:
    """Run in the script's process before exec (see RESET_SIGNALS)."""
    for sig in RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
