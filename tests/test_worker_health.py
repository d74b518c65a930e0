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
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sd_rest.jobs.manager import JobManager
from sd_rest.runs.runners import Runners
from sd_rest.state.jobs import Status

from helpers import (
    FAST_SIMULATOR,
    Server,
    check_finished_job,
    job_folder,
    process_running,
    wait_until,
)
from inprocess import settings, text_params, until


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
        assert isinstance(manager.runners, Runners) and manager.runners.pool is not None
        pool = manager.runners.pool
        await until(lambda: [w["state"] for w in pool.describe()] == ["idle"], "a warm worker")
        (worker,) = pool.describe()
        os.kill(worker["pid"], signal.SIGSTOP)
        try:
            await asyncio.sleep(0.3)
            (stopped,) = pool.describe()  # not a coroutine: it cannot wait on the worker
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
        ran_under: dict[str, int | None] = {}
        manager.events.listen(
            lambda e: ran_under.setdefault(e.job.id, e.job.pid) if e.kind == "started" else None
        )
        await until(lambda: _idle(manager), "a warm worker")
        (first,) = await manager.workers()
        pid = first["pid"]
        os.kill(pid, signal.SIGKILL)
        await until(lambda: _listed_as(manager, pid, "gone"), "the dead worker listed as gone")
        (gone,) = [w for w in await manager.workers() if w["pid"] == pid]
        assert "SIGKILL" in gone["ended"] and gone["rss"] is None, gone
        await until(lambda: _idle(manager, not_pid=pid), "its replacement, warm, with no job")
        (replacement,) = [w for w in await manager.workers() if w["state"] == "idle"]
        assert replacement["models"], replacement  # it has loaded the model already
        job = await manager.submit("text-to-image", text_params(), {}, {})
        await until(lambda: job.status.finished, "the job", timeout=30)
        assert job.status is Status.COMPLETE, job.error
        assert ran_under[job.id] == replacement["pid"]
        await manager.shutdown()

    asyncio.run(scenario())


def _pool_listing(manager: JobManager) -> list[dict[str, Any]]:
    assert isinstance(manager.runners, Runners) and manager.runners.pool is not None
    return manager.runners.pool.describe()


def _idle(manager: JobManager, not_pid: int | None = None) -> bool:
    return any(w["state"] == "idle" and w["pid"] != not_pid for w in _pool_listing(manager))


def _listed_as(manager: JobManager, pid: int, state: str) -> bool:
    return any(w["pid"] == pid and w["state"] == state for w in _pool_listing(manager))


# Busy in Python for 3 s, past a 1 s limit, then writes its image: the heartbeat comes from a
# thread of its own, not from the script's progress.
BUSY_THEN_WRITES = """\
    import os, sys, time, zlib, struct
    end = time.monotonic() + 3
    while time.monotonic() < end:
        sum(range(1000))
    out = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--outdir="))
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    png = (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\\0\\0")) + chunk(b"IEND", b""))
    with open(os.path.join(out, "samples", "00000.png"), "wb") as f:
        f.write(png)
"""


def test_a_script_silent_for_longer_than_the_limit_is_not_killed(tmp_path: Path) -> None:
    async def scenario() -> None:
        scripts = tmp_path / "repo" / "scripts"
        scripts.mkdir(parents=True)
        for name in ("txt2img.py", "img2img.py", "inpaint.py"):
            (scripts / name).write_text(textwrap.dedent(BUSY_THEN_WRITES))
        config = settings(
            tmp_path / "out", repository=tmp_path / "repo", worker_timeout=1.0, warm_start=False
        )
        manager = JobManager(config)
        await manager.start(manager.recover())
        job = await manager.submit("text-to-image", text_params(), {}, {})
        await until(lambda: job.status.finished, "the job", timeout=30)
        assert job.status is Status.COMPLETE, job.error
        (worker,) = await manager.workers()
        assert worker["state"] == "idle" and process_running(worker["pid"])
        await manager.shutdown()

    asyncio.run(scenario())
