"""The resident runner in process: its workers reused, replaced and ended as the settings and
the runs ask; cancels, out-of-memory failures and dead workers. Scripts are small stand-ins
written by each test for what the simulator never does (ignore interrupts, run out of memory,
die), run by the real worker driver in real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
import time
from pathlib import Path

import pytest

from sd_rest.endpoints import ENDPOINTS
from sd_rest.jobs.manager import JobManager
from sd_rest.runs import worker_pool
from sd_rest.runs.resident_runner import WORKER_KILL_AFTER
from sd_rest.runs.worker_pool import WorkerPool
from sd_rest.state.jobs import Job, Status

from helpers import FAST_SIMULATOR, SIMULATOR, mask_bytes, png_bytes, process_running
from inprocess import (
    WRITES_AN_IMAGE,
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


def says(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text(errors="replace")


async def finished(job: object) -> None:
    await until(lambda: job.status.finished, "the job to finish", timeout=30)  # type: ignore[attr-defined]


def test_jobs_share_a_worker_and_get_a_fresh_one_after_max_jobs(tmp_path: Path) -> None:
    async def scenario() -> None:
        repo = stand_in_repository(tmp_path, WRITES_AN_IMAGE)
        manager = JobManager(settings(tmp_path / "out", repository=repo, worker_max_jobs=2))
        await manager.start(manager.recover())
        ran_under = started_pids(manager)
        pids = []
        for n in range(3):
            job = await manager.submit("text-to-image", text_params(prompt=f"p{n}"), {}, {})
            await finished(job)
            assert job.status is Status.COMPLETE, job.error
            pids.append(ran_under[job.id])
        await manager.shutdown()
        assert pids[0] == pids[1] != pids[2]  # the third job came after the first worker's two
        assert not any(process_running(pid) for pid in pids if pid)  # none left after shutdown

    asyncio.run(scenario())


def test_a_worker_idle_too_long_gives_its_memory_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_pool, "REAP_EVERY", 0.05)

    async def scenario() -> None:
        repo = stand_in_repository(tmp_path, WRITES_AN_IMAGE)
        config = settings(tmp_path / "out", repository=repo, worker_idle_seconds=0.3)
        manager = JobManager(config)
        await manager.start(manager.recover())
        ran_under = started_pids(manager)
        job = await manager.submit("text-to-image", text_params(), {}, {})
        await finished(job)
        pid = ran_under[job.id]
        assert pid is not None and [w["state"] for w in manager.workers()] == ["idle"]
        await until(lambda: not process_running(pid), "the idle worker to end")
        assert manager.workers() == []
        again = await manager.submit("text-to-image", text_params(prompt="later"), {}, {})
        await finished(again)  # a new worker when one is needed again
        assert again.status is Status.COMPLETE and ran_under[again.id] != pid
        await manager.shutdown()

    asyncio.run(scenario())


DEAF = """\
    import signal, time
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("Loading model from a checkpoint that takes forever", flush=True)
    time.sleep(60)
"""


async def deaf_job_loading(tmp_path: Path) -> tuple[JobManager, Job]:
    """A manager whose one job's script (DEAF) is "loading its model" in a worker (no warm
    start: its warm-up would be as deaf)."""
    repo = stand_in_repository(tmp_path, DEAF)
    manager = JobManager(settings(tmp_path / "out", repository=repo, warm_start=False))
    await manager.start(manager.recover())
    job = await manager.submit("text-to-image", text_params(), {}, {})
    log = manager.store.layout.log(job.endpoint, job.id)
    await until(lambda: says(log, "Loading model"), "the script")
    return manager, job


def test_a_cancel_the_script_ignores_kills_the_worker_within_a_second(tmp_path: Path) -> None:
    async def scenario() -> None:
        manager, job = await deaf_job_loading(tmp_path)
        pid = job.pid
        began = time.monotonic()
        await manager.cancel(job)
        assert job.status is Status.CANCELED
        assert time.monotonic() - began < WORKER_KILL_AFTER + 1.0
        await until(lambda: not process_running(pid), "the worker to be killed")  # type: ignore[arg-type]
        await manager.shutdown()

    asyncio.run(scenario())


# Fails the first time it runs (a marker file says which run it is), as the test asks.
FIRST_RUN_FAILS = """\
    import os, signal, sys
    marker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ran-once")
    if not os.path.exists(marker):
        open(marker, "w").close()
        {failure}
"""
OUT_OF_MEMORY = 'raise RuntimeError("MPS backend out of memory (MPS allocated: 17.5 GB)")'
KILLED = "os.kill(os.getpid(), signal.SIGKILL)"


@pytest.mark.parametrize("failure", [OUT_OF_MEMORY, KILLED], ids=["out-of-memory", "killed"])
def test_a_run_that_runs_out_of_memory_gets_a_second_chance_in_a_fresh_worker(
    tmp_path: Path, failure: str
) -> None:
    async def scenario() -> None:
        script = FIRST_RUN_FAILS.format(failure=failure) + textwrap.indent(
            textwrap.dedent(WRITES_AN_IMAGE), "    "
        )
        repo = stand_in_repository(tmp_path, script)
        # No warm start: its warm-up would be the script's first run.
        manager = JobManager(settings(tmp_path / "out", repository=repo, warm_start=False))
        await manager.start(manager.recover())
        job = await manager.submit("text-to-image", text_params(), {}, {})
        await finished(job)
        assert job.status is Status.COMPLETE, job.error
        log = manager.store.layout.log(job.endpoint, job.id).read_text(errors="replace")
        assert log.count("=== sd-rest run") == 2  # the first run, and the second chance
        await manager.shutdown()

    asyncio.run(scenario())


def test_a_worker_that_dies_every_time_fails_the_job_saying_how(tmp_path: Path) -> None:
    async def scenario() -> None:
        repo = stand_in_repository(tmp_path, f"import os, signal\n{KILLED}\n")
        manager = JobManager(settings(tmp_path / "out", repository=repo))
        await manager.start(manager.recover())
        job = await manager.submit("text-to-image", text_params(), {}, {})
        await finished(job)
        assert job.status is Status.FAILED
        assert job.error is not None and job.error.startswith("the script was killed by SIGKILL")
        # The warm-up's, the run's and its second chance's: all gone, none replaced (a
        # warm-up that failed is not tried again until a job succeeds).
        assert [w["state"] for w in manager.workers()] == ["gone"] * 3
        await manager.shutdown()

    asyncio.run(scenario())


def test_status_answers_while_a_job_runs(tmp_path: Path) -> None:
    async def scenario() -> None:
        manager, job = await deaf_job_loading(tmp_path)
        began = time.monotonic()
        (worker,) = manager.workers()
        assert time.monotonic() - began < 1.0
        assert (worker["state"], worker["pid"], worker["jobs"]) == ("busy", job.pid, 0)
        assert worker["rss"] > 1_000_000
        await manager.cancel(job)
        await manager.shutdown()

    asyncio.run(scenario())


def test_a_worker_that_cannot_connect_is_reported(tmp_path: Path) -> None:
    async def scenario() -> None:
        fake = tmp_path / "python"
        fake.write_text("#!/bin/sh\necho 'no driver here'\nexit 3\n")
        os.chmod(fake, 0o755)
        manager = JobManager(settings(tmp_path / "out", python=fake))
        await manager.start(manager.recover())
        job = await manager.submit("text-to-image", text_params(), {}, {})
        await finished(job)
        assert job.status is Status.FAILED
        assert job.error is not None and job.error.startswith("the worker did not start")
        await manager.shutdown()

    asyncio.run(scenario())


# inpaint.py's output, <outdir>/<input's name>.png, from a script that never imports torch.
INPAINT_WITHOUT_TORCH = """\
    import os, sys, zlib, struct
    arg = lambda name: next(a.split("=", 1)[1] for a in sys.argv if a.startswith(name + "="))
    name = next(f for f in os.listdir(arg("--indir")) if not f.endswith("_mask.png"))
    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    png = (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\\0\\0")) + chunk(b"IEND", b""))
    with open(os.path.join(arg("--outdir"), name), "wb") as f:
        f.write(png)
"""


@pytest.mark.parametrize("runner", ["process", "resident"])
def test_an_interpreter_without_torch_runs_inpaint_the_same_in_both_runners(
    tmp_path: Path, runner: str
) -> None:
    """inpaint's seed is given to torch before the script; an interpreter that cannot import
    torch runs the script anyway (the sitecustomize passes over the ImportError): the script
    decides. The resident worker used to fail itself ("driver failed", status 70) instead."""

    async def scenario() -> None:
        repo = stand_in_repository(tmp_path, INPAINT_WITHOUT_TORCH)
        config = settings(tmp_path / "out", repository=repo, runner=runner, warm_start=False)
        manager = JobManager(config)
        await manager.start(manager.recover())
        endpoint = ENDPOINTS["inpaint-image"]
        uploads = {"image": png_bytes(256, 256), "mask": mask_bytes(256, 256)}
        params = {**endpoint.defaults, "steps": 2}
        job = await manager.submit(
            "inpaint-image", params, uploads, endpoint.prepare_inputs(uploads)
        )
        await finished(job)
        assert job.status is Status.COMPLETE, job.error
        log = manager.store.layout.log(job.endpoint, job.id).read_text(errors="replace")
        assert log.count("=== sd-rest run") == 1, log  # no second chance was needed
        await manager.shutdown()

    asyncio.run(scenario())


# An exception whose message alone is far over asyncio's default line limit (64 KiB).
HUGE_ERROR = 'raise ValueError("a huge message: " + "x" * 200_000)\n'


def test_a_script_error_with_a_huge_message_fails_the_job_at_once(tmp_path: Path) -> None:
    """The worker's `finished` carries the script's error, capped: it used to carry all of it, a
    line the server could not read; the server then read nothing more from that worker, killed
    it as silent after --worker-timeout and retried the job, which failed minutes later saying
    so."""

    async def scenario() -> None:
        repo = stand_in_repository(tmp_path, HUGE_ERROR)
        manager = JobManager(settings(tmp_path / "out", repository=repo, warm_start=False))
        await manager.start(manager.recover())
        job = await manager.submit("text-to-image", text_params(), {}, {})
        await until(lambda: job.status.finished, "the job to fail", timeout=15)
        assert job.status is Status.FAILED
        assert job.error is not None and job.error.startswith("ValueError: a huge message: x")
        log = manager.store.layout.log(job.endpoint, job.id).read_text(errors="replace")
        assert log.count("=== sd-rest run") == 1  # no second chance: the script failed
        assert "x" * 200_000 in log  # the whole message is in the job's log
        (worker,) = manager.workers()
        assert worker["state"] == "idle" and process_running(worker["pid"]), worker
        await manager.shutdown()

    asyncio.run(scenario())


def test_a_worker_that_dies_before_its_run_request_is_reported_dead(tmp_path: Path) -> None:
    """Killed after the pool handed it out and before the run's request is sent: the run is
    settled as the worker's death, which the runner retries in a fresh worker as after any
    crash. The request used to raise OSError, failing the job "inside the server". (Reaching
    that moment through a job is a matter of timing: the worker is driven here as its runner
    drives it.)"""

    async def scenario() -> None:
        pool = WorkerPool(settings(tmp_path / "out", warm_start=False))
        worker = await pool.acquire(asyncio.Event())
        assert worker is not None and worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        await until(lambda: worker.gone, "the server to see the worker end")
        script = SIMULATOR / "scripts" / "txt2img.py"
        run = worker.run("job", script, [], tmp_path, None, lambda _: None, lambda: None)
        finished = await asyncio.wait_for(run, 10)
        assert finished.outcome == "died" and finished.died is not None
        assert "SIGKILL" in finished.died.describe(), finished
        pool.release(worker)
        await pool.close()

    asyncio.run(scenario())
