"""Finding and ending script processes: ours only, and always the whole process group."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def command_line(pid: int) -> str | None:
    """The process's command line, or None when it is gone (Linux /proc, else `ps` on macOS)."""
    proc = Path(f"/proc/{pid}/cmdline")
    if proc.parent.parent.is_dir() and Path("/proc/self").exists():
        try:
            return proc.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return None
    try:
        result = subprocess.run(
            ["ps", "-p", str(pid), "-o", "command="],
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


def end_orphan(pid: int, marker: str) -> bool:
    """Kill a script left running by a previous server, only if its command line names `marker`.

    The pid may have been reused by an unrelated process since; the marker (the job's own run
    folder, which is in the script's argv) tells ours apart.
    """
    cmd = command_line(pid)
    if cmd is None or marker not in cmd:
        return False
    return signal_group(pid, signal.SIGKILL) or _kill(pid)


def _kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True
