"""Resident workers that hang or die are noticed (issue 17): a worker proves it is alive by a
heartbeat on its channel; one silent for longer than --worker-timeout (SIGSTOPped here) is
killed and its job resumed in a fresh worker, every image once; one that dies while idle is
listed as gone and replaced before a job needs it; `GET /` never waits on a worker. Real
servers and real worker processes on the simulator, signalled from the test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sd_rest.jobs.manager import JobManager
from sd_rest.state.jobs import Status

from helpers import (
    FAST_SIMULATOR,
    Server,
    check_finished_job,
    job_folder,
    process_running,
    wait_until,
)
from inprocess import (
    BUSY_THEN_WRITES,
    settings,
    stand_in_repository,
    started_pids,
    text_params,
    until,
)


@pytest.fixture(autouse=True)
def fast_simulator(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in FAST_SIMULATOR.items():
        monkeypatch.setenv(name, value)


def listed(server: Server) -> list[dict[str, Any]]:
    return list(server.get("/").json()["workers"])


def test_a_stopped_worker_is_killed_and_its_job_resumed_every_image_once(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = make_server(["--worker-timeout", "2"], env={"SD_SIM_STEP_SECONDS": "0.04"})
    params = {"prompt": "a stopped worker", "iterations": "3", "steps": "10", "seed": "77",
              "width": "256", "height": "256"}  # fmt: skip
    url = server.post_form("text-to-image", params).headers["Location"]
    wait_until(lambda: len(server.get(url).json()["imageUrls"]) == 1, "image 1")
    (busy,) = [w for w in listed(server) if w["state"] == "busy"]
    pid = busy["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        # Stopped, it sends nothing: GET / still answers, from what the server knows.
        status = server.get(url).json()
        assert status["status"] == "IN_PROGRESS"
        wait_until(lambda: not process_running(pid), "the stopped worker to be killed", 30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # the test's own clean-up, if the server did not
    server.wait_status(url, {"COMPLETE", "FAILED"}, timeout=60)
    check_finished_job(server, url, params, tmp_path / "by-hand")  # 1..3, once, byte-identical
    (gone,) = [w for w in listed(server) if w["pid"] == pid]
    assert gone["state"] == "gone" and "without a heartbeat" in gone["ended"], gone
    assert "(--worker-timeout 2): killing it" in server.log()
    job_log = (job_folder(server.output, url) / "job.log").read_text(errors="replace")
    assert "sent no heartbeat for" in job_log and job_log.count("=== sd-rest run") == 2


def test_the_workers_listing_never_asks_a_worker(tmp_path: Path) -> None:
    """What `GET /` shows comes from the heartbeats the pool has: a plain call, no waiting,
    even while the worker is stopped (it used to ask the worker and wait up to 0.5 s)."""

    async def scenario() -> None:
        manager = JobManager(settings(tmp_path / "out"))
        await manager.start(manager.recover())
        await until(lambda: [w["state"] for w in manager.workers()] == ["idle"], "a warm worker")
        (worker,) = manager.workers()
        os.kill(worker["pid"], signal.SIGSTOP)
        try:
            await asyncio.sleep(0.3)
            (stopped,) = manager.workers()  # not a coroutine: it cannot wait on the worker
            assert stopped["state"] == "idle" and stopped["rss"] > 1_000_000, stopped
            assert stopped["silent"] >= 0.3 and stopped["models"], stopped
        finally:
            os.kill(worker["pid"], signal.SIGCONT)
        await manager.shutdown()

    asyncio.run(scenario())


def test_an_idle_worker_that_dies_is_listed_gone_and_replaced_before_a_job_needs_it(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        manager = JobManager(settings(tmp_path / "out"))
        await manager.start(manager.recover())
        ran_under = started_pids(manager)
        await until(lambda: _idle(manager), "a warm worker")
        (first,) = manager.workers()
        pid = first["pid"]
        os.kill(pid, signal.SIGKILL)
        await until(lambda: _listed_as(manager, pid, "gone"), "the dead worker listed as gone")
        (gone,) = [w for w in manager.workers() if w["pid"] == pid]
        assert "SIGKILL" in gone["ended"] and gone["rss"] is None, gone
        await until(lambda: _idle(manager, not_pid=pid), "its replacement, warm, with no job")
        (replacement,) = [w for w in manager.workers() if w["state"] == "idle"]
        assert replacement["models"], replacement  # it has loaded the model already
        job = await manager.submit("text-to-image", text_params(), {}, {})
        await until(lambda: job.status.finished, "the job", timeout=30)
        assert job.status is Status.COMPLETE, job.error
        assert ran_under[job.id] == replacement["pid"]
        await manager.shutdown()

    asyncio.run(scenario())


def _idle(manager: JobManager, not_pid: int | None = None) -> bool:
    return any(w["state"] == "idle" and w["pid"] != not_pid for w in manager.workers())


def _listed_as(manager: JobManager, pid: int, state: str) -> bool:
    return any(w["pid"] == pid and w["state"] == state for w in manager.workers())


def test_a_script_silent_for_longer_than_the_limit_is_not_killed(tmp_path: Path) -> None:
    async def scenario() -> None:
        repo = stand_in_repository(tmp_path, BUSY_THEN_WRITES)
        config = settings(tmp_path / "out", repository=repo, worker_timeout=1.0, warm_start=False)
        manager = JobManager(config)
        await manager.start(manager.recover())
        job = await manager.submit("text-to-image", text_params(), {}, {})
        await until(lambda: job.status.finished, "the job", timeout=30)
        assert job.status is Status.COMPLETE, job.error
        (worker,) = manager.workers()
        assert worker["state"] == "idle" and process_running(worker["pid"])
        await manager.shutdown()

    asyncio.run(scenario())
