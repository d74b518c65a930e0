"""Stopping: SIGINT/SIGTERM end the scripts and leave jobs resumable; a kill -9 of the server
leaves no script running, even when the server ignored SIGHUP (started under nohup)."""

from __future__ import annotations

import http.client
import os
import signal
import ssl
from pathlib import Path

import pytest

from helpers import (
    Server,
    check_finished_job,
    process_running,
    read_jsonl,
    read_sidecar,
    script_pids,
    wait_gone,
    wait_until,
)

# They count the simulator's runs and read its event log: no warm-up run (conftest.py).
pytestmark = pytest.mark.no_warm_start


PARAMS = {
    "prompt": "a lighthouse in fog",
    "steps": "4",
    "iterations": "3",
    "seed": "4242",
    "width": "256",
    "height": "256",
}


def marker(url: str) -> str:
    return url.strip("/").replace("/", ".")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_ends_scripts_exits_0_and_jobs_resume(
    make_server, tmp_path: Path, sig: signal.Signals
) -> None:
    argv_log, events = tmp_path / "argv.jsonl", tmp_path / "events.jsonl"
    env = {
        "SD_SIM_ARGV_LOG": str(argv_log),
        "SD_SIM_EVENT_LOG": str(events),
        "SD_SIM_STEP_SECONDS": "0.05",
    }
    server = make_server(env=env)
    params = {**PARAMS, "iterations": "5"}  # far from done when the signal comes
    running = server.post_form("text-to-image", params).headers["Location"]
    queued = server.post_form("text-to-image", {**PARAMS, "prompt": "next"}).headers["Location"]
    wait_until(lambda: len(server.get(running).json()["imageUrls"]) == 1, "image 1 published")
    (pid,) = script_pids(argv_log)

    assert server.stop(sig) == 0
    wait_gone([pid])
    assert "stopping: no new jobs" in server.log()
    sidecar = read_sidecar(server.output, running)
    # Back in the queue, on disk (the state machine's running -> queued on shutdown).
    assert sidecar["status"] == "QUEUED" and sidecar["pid"] is None
    assert len(sidecar["images"]) >= 1
    assert read_sidecar(server.output, queued)["status"] == "QUEUED"
    markers = sorted(p.name for p in (server.output / ".queue").iterdir())
    assert markers == sorted([marker(running), marker(queued)])

    server = make_server(output=server.output, env={**env, "SD_SIM_STEP_SECONDS": "0.01"})
    for url, job_params in ((running, params), (queued, {**PARAMS, "prompt": "next"})):
        assert server.wait_status(url, {"COMPLETE", "FAILED"})["status"] == "COMPLETE"
        # Reproducing the images by their recorded seeds once is enough.
        check_finished_job(server, url, job_params, tmp_path if sig == signal.SIGTERM else None)
    assert len(script_pids(argv_log, running)) == 2
    assert len(script_pids(argv_log, queued)) == 1


def post_while_stopping(server: Server) -> int | None:
    """A POST's status, or None when the connection is refused or cut."""
    try:
        return server.post_form("text-to-image", {**PARAMS, "prompt": "too late"}).status
    except (OSError, http.client.HTTPException, ssl.SSLError):
        return None


def test_a_script_that_does_not_stop_is_killed_after_the_grace(make_server, tmp_path: Path) -> None:
    argv_log = tmp_path / "argv.jsonl"
    env = {"SD_SIM_ARGV_LOG": str(argv_log), "SD_SIM_STEP_SECONDS": "0.1"}
    server = make_server(env=env)
    url = server.post_form("text-to-image", PARAMS).headers["Location"]
    server.wait_status(url, {"IN_PROGRESS"})
    (pid,) = script_pids(argv_log)
    os.kill(pid, signal.SIGSTOP)  # the interrupt stays pending: only the kill can end it
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    answers = []
    while server.process.poll() is None:
        answers.append(post_while_stopping(server))
    assert server.process.wait() == 0
    assert 303 not in answers, answers
    wait_gone([pid])
    assert read_sidecar(server.output, url)["status"] == "QUEUED"  # resumable

    server = make_server(output=server.output, env={**env, "SD_SIM_STEP_SECONDS": "0.01"})
    assert server.wait_status(url, {"COMPLETE", "FAILED"})["status"] == "COMPLETE"
    check_finished_job(server, url, PARAMS, tmp_path)
    assert server.post_form("text-to-image", {**PARAMS, "prompt": "too late"}).status == 303


SIGHUP_BIT = 1 << (signal.SIGHUP - 1)
SIGINT_BIT = 1 << (signal.SIGINT - 1)


def ignored_signals(pid: int) -> int:
    """The process's mask of ignored signals (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigIgn for {pid}")


class NohupServer(Server):
    """The server started under nohup: SIGHUP ignored, which a child inherits through exec."""

    def command(self) -> list[str]:
        return ["nohup", *super().command()]


@pytest.mark.parametrize("nohup", [False, True], ids=["plain", "nohup"])
def test_kill_9_of_the_server_leaves_no_script_running(
    make_server, tmp_path: Path, certs: tuple[str, str, str], nohup: bool
) -> None:
    argv_log = tmp_path / "argv.jsonl"
    # Steps so long that a script could only end by the hang-up's SIGHUP, not by failing to
    # write its next progress line to the closed pty.
    env = {"SD_SIM_ARGV_LOG": str(argv_log), "SD_SIM_STEP_SECONDS": "60"}
    args = ["--concurrency", "2", "--no-warm-start"]  # a warm-up step would take 60 s too
    if nohup:
        server: Server = NohupServer(output=tmp_path / "output", certs=certs, args=args, env=env)
        server.start()
    else:
        server = make_server(args=args, env=env)
    try:
        urls = [
            server.post_form("text-to-image", {**PARAMS, "prompt": f"job {n}"}).headers["Location"]
            for n in range(2)
        ]
        wait_until(lambda: len(read_jsonl(argv_log)) == 2, "both scripts started")
        for url in urls:
            server.wait_status(url, {"IN_PROGRESS"})
        pids = script_pids(argv_log)
        assert server.process is not None
        assert ignored_signals(server.process.pid) & SIGHUP_BIT == (SIGHUP_BIT if nohup else 0)
        for pid in pids:
            assert ignored_signals(pid) & (SIGHUP_BIT | SIGINT_BIT) == 0
        server.kill()
        # The pty hang-up ends them: nothing else is left to do it.
        wait_gone(pids)
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()
        for pid in script_pids(argv_log):
            if process_running(pid):  # only when the test failed: do not leave it running
                os.kill(pid, signal.SIGKILL)
