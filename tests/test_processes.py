"""Finding and ending script processes (sd_rest/runs/processes.py), on real processes, both ways:
Linux's /proc, and `ps` as on macOS, run here with /proc hidden from the module."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sd_rest.runs import processes

from helpers import wait_until

# Each program started here prints a line once it runs: until then, its command line may
# still be the parent's (between fork and exec) or empty.
SLEEPER = "import time; print('up', flush=True); time.sleep(60)"


@pytest.fixture(params=["proc", "ps"])
def way(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which way the module looks processes up; "ps" hides /proc behind an empty folder."""
    if request.param == "ps":
        empty = tmp_path / "no-proc"
        empty.mkdir()
        monkeypatch.setattr(processes, "PROC", empty)
    elif not Path("/proc/self/stat").exists():
        pytest.skip("no /proc here: the ps way is the only one")
    # A shell that exports COLUMNS passes it on to the server, and so to the `ps` it runs.
    monkeypatch.setenv("COLUMNS", "80")
    assert processes._proc_available() == (request.param == "proc")
    return str(request.param)


@pytest.fixture
def start() -> Iterator[Callable[..., tuple[subprocess.Popen[str], str]]]:
    """Start processes; each still there at the end is killed (with its group if it leads
    one) and reaped."""
    started: list[tuple[subprocess.Popen[str], bool]] = []

    def run(*argv: str, leader: bool = False) -> tuple[subprocess.Popen[str], str]:
        """The process, once it has printed its first line, and that line."""
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, text=True, start_new_session=leader
        )
        started.append((process, leader))
        assert process.stdout is not None
        return process, process.stdout.readline().strip()

    yield run
    for process, leader in started:
        with contextlib.suppress(ProcessLookupError):
            if leader:
                os.killpg(process.pid, signal.SIGKILL)
            elif process.poll() is None:
                process.kill()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def run_folder(tmp_path: Path, job_id: str) -> str:
    """A job's run folder, the marker the server looks for in a script's command line. The
    long output folder puts the marker past 80 columns, as a real path often is."""
    return str(tmp_path / ("output-" + "o" * 100) / "text-to-image" / job_id / "run")


def zombie(start: Callable[..., tuple[subprocess.Popen[str], str]]) -> subprocess.Popen[str]:
    """A child that has exited and is not reaped yet (until the test's end)."""
    process, _ = start(sys.executable, "-c", "print('up')")
    os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)  # wait, but leave it a zombie
    return process


def test_command_line_of_a_live_process_is_whole(way: str, start, tmp_path: Path) -> None:
    run = run_folder(tmp_path, "a" * 32)
    process, _ = start(sys.executable, "-c", SLEEPER, f"--outdir={run}/out")
    command = processes.command_line(process.pid)
    assert command is not None
    assert command is not None
    assert command.split() == [sys.executable, "-c", *SLEEPER.split(), f"--outdir={run}/out"]


def test_command_line_of_a_zombie_is_empty_and_of_a_gone_process_none(way: str, start) -> None:
    ended = zombie(start)
    assert processes.command_line(ended.pid) == ""
    ended.wait()
    assert processes.command_line(ended.pid) is None


def test_is_running_alive_zombie_gone(way: str, start) -> None:
    alive, _ = start(sys.executable, "-c", SLEEPER)
    assert processes.is_running(alive.pid)
    ended = zombie(start)
    assert not processes.is_running(ended.pid)
    ended.wait()
    assert not processes.is_running(ended.pid)
    assert processes.is_running(alive.pid)  # still: looking did not disturb it


def test_end_orphan_kills_our_script_and_its_whole_group(way: str, start, tmp_path: Path) -> None:
    run = run_folder(tmp_path, "a" * 32)
    # A session leader, as a script on its pty is, with a child of its own in its group.
    script, child_pid = start(
        sys.executable,
        "-c",
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {SLEEPER!r}],\n"
        "                         stdout=subprocess.DEVNULL)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n",
        "scripts/txt2img.py",
        f"--outdir={run}/out",
        leader=True,
    )
    child = int(child_pid)
    assert processes.is_running(child)

    assert processes.end_orphan(script.pid, (run, "scripts/txt2img.py"), wait=10)
    # end_orphan waits until it is gone: dead on return (a zombie of ours until reaped).
    assert not processes.is_running(script.pid)
    assert script.wait(10) == -signal.SIGKILL
    wait_until(lambda: not processes.is_running(child), "the script's own child to be killed")


def test_end_orphan_kills_our_script_that_leads_no_group(way: str, start, tmp_path: Path) -> None:
    run = run_folder(tmp_path, "a" * 32)
    # Started without a session of its own (in the test's process group): only it is killed.
    script, _ = start(sys.executable, "-c", SLEEPER, "scripts/txt2img.py", f"--outdir={run}/out")
    assert processes.end_orphan(script.pid, (run, "scripts/txt2img.py"), wait=10)
    assert script.wait(10) == -signal.SIGKILL


def test_end_orphan_leaves_a_process_that_is_not_ours(way: str, start, tmp_path: Path) -> None:
    # The recorded pid now belongs to another program: the same script for another job, or
    # something else altogether.
    run = run_folder(tmp_path, "a" * 32)
    other_job, _ = start(
        sys.executable,
        "-c",
        SLEEPER,
        "scripts/txt2img.py",
        f"--outdir={run_folder(tmp_path, 'b' * 32)}/out",
        leader=True,
    )
    unrelated, _ = start(sys.executable, "-c", SLEEPER, leader=True)
    for process in (other_job, unrelated):
        assert not processes.end_orphan(process.pid, (run, "scripts/txt2img.py"), wait=1)
    for process in (other_job, unrelated):
        assert processes.is_running(process.pid) and process.poll() is None
