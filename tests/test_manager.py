"""The manager with its store, queue and script runner, in process: real scripts (the
simulator, or a small stand-in written by the test for what the simulator never does), real
files, the event loop of the test. Reaches what only timing reaches over HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sd_rest.jobs.manager import JobManager
from sd_rest.runs.job_run import CANCEL_KILL_AFTER
from sd_rest.state import lifecycle
from sd_rest.state.jobs import ImageRecord, Job, Status

from helpers import FAST_SIMULATOR, process_running
from inprocess import Recorder, settings, stand_in_repository, text_params, until


@pytest.fixture(autouse=True)
def fast_simulator(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in FAST_SIMULATOR.items():
        monkeypatch.setenv(name, value)


async def started(manager: JobManager, job: Job, says: str = "") -> int:
    """The script's pid once it runs (and has printed `says`, when given)."""
    await until(lambda: job.status is Status.IN_PROGRESS and job.pid, "the script to start")
    log = manager.store.layout.log(job.endpoint, job.id)
    await until(lambda: says in log.read_text(errors="replace"), f"the script to say {says!r}")
    assert job.pid is not None
    return job.pid


def test_a_job_runs_through_every_event_in_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        manager = JobManager(settings(tmp_path / "output"))
        recorder = Recorder(manager.events)
        await manager.start(manager.recover())
        job = await manager.submit("text-to-image", text_params(iterations=2), {}, {})
        await until(lambda: job.status.finished, "the job to finish")
        await manager.shutdown()
        assert job.status is Status.COMPLETE
        assert recorder.without_progress(job) == [
            "queued",
            "moved",  # into the queue, at position 1
            "moved",  # taken by the worker: position 0
            "started",
            "image",
            "image",
            "complete",
        ]
        moves = [e.data for e in recorder.seen if e.job is job and e.kind == "moved"]
        assert moves == [1, 0]
        progress = [e.data for e in recorder.seen if e.job is job and e.kind == "progress"]
        assert progress == sorted(progress) and progress[-1] == (2, 1.0)
        versions = [e.id for e in recorder.seen if e.job is job]
        assert versions == sorted(versions)
        assert job.version == len(recorder.kinds(job))

    asyncio.run(scenario())


@pytest.mark.parametrize("runner", ["resident", "process"])
def test_cancel_while_queued_and_while_running(tmp_path: Path, runner: str) -> None:
    async def scenario() -> None:
        manager = JobManager(settings(tmp_path / "output", runner=runner))
        await manager.start(manager.recover())
        os.environ["SD_SIM_STEP_SECONDS"] = "0.2"
        try:
            running = await manager.submit("text-to-image", text_params(iterations=3), {}, {})
            waiting = await manager.submit("text-to-image", text_params(prompt="next"), {}, {})
            await until(lambda: len(running.images) == 1, "image 1")
            assert (await manager.cancel(waiting)).status is Status.CANCELED  # at once
            pid = running.pid
            assert pid is not None
            started_at = time.monotonic()
            await manager.cancel(running)
            assert running.status is Status.CANCELED
            assert time.monotonic() - started_at < 1.5
            if runner == "process":
                assert not process_running(pid)
            else:  # the script ended inside the worker, which serves on
                (worker,) = manager.workers()
                assert worker["state"] == "idle" and process_running(pid)
            assert len(running.images) == 1  # kept
            assert (await manager.cancel(running)).status is Status.CANCELED  # idempotent
        finally:
            os.environ["SD_SIM_STEP_SECONDS"] = FAST_SIMULATOR["SD_SIM_STEP_SECONDS"]
            await manager.shutdown()

    asyncio.run(scenario())


STUBBORN = """\
    import signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("Loading model from a checkpoint that takes forever", flush=True)
    time.sleep(60)
"""


def test_a_script_deaf_to_sigterm_is_killed_soon_after_a_cancel(tmp_path: Path) -> None:
    async def scenario() -> None:
        repo = stand_in_repository(tmp_path, STUBBORN)
        config = settings(tmp_path / "output", repository=repo, runner="process")
        manager = JobManager(config)
        await manager.start(manager.recover())
        job = await manager.submit("text-to-image", text_params(), {}, {})
        pid = await started(manager, job, says="Loading model")  # its signals are set by then
        began = time.monotonic()
        await manager.cancel(job)
        assert job.status is Status.CANCELED
        assert CANCEL_KILL_AFTER <= time.monotonic() - began < CANCEL_KILL_AFTER + 1.0
        assert not process_running(pid)
        await manager.shutdown()

    asyncio.run(scenario())


def test_shutdown_kills_a_deaf_script_after_the_grace_and_requeues_its_job(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        repo = stand_in_repository(tmp_path, STUBBORN)
        config = settings(
            tmp_path / "output", repository=repo, shutdown_grace=0.3, runner="process"
        )
        manager = JobManager(config)
        await manager.start(manager.recover())
        job = await manager.submit("text-to-image", text_params(), {}, {})
        pid = await started(manager, job, says="Loading model")
        await manager.shutdown()
        assert not process_running(pid)
        assert job.status is Status.QUEUED and job.pid is None
        again = JobManager(config)
        (recovered,) = again.recover()
        assert (recovered.id, recovered.status, recovered.attempts) == (job.id, Status.QUEUED, 1)

    asyncio.run(scenario())


@pytest.mark.parametrize("runner", ["resident", "process"])
def test_an_interpreter_that_cannot_start_fails_the_job(tmp_path: Path, runner: str) -> None:
    async def scenario() -> None:
        python = tmp_path / "python"
        python.write_text("not a program")  # there, but not executable
        manager = JobManager(settings(tmp_path / "output", python=python, runner=runner))
        await manager.start(manager.recover())
        job = await manager.submit("text-to-image", text_params(), {}, {})
        await until(lambda: job.status.finished, "the job to fail")
        await manager.shutdown()
        assert job.status is Status.FAILED
        assert job.error is not None and job.error.startswith(f"could not start {python}")

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("script", "error"),
    [
        (
            'print("all done, nothing drawn")\n',
            "the script exited without writing image 1 of 1",
        ),
        (
            'import sys\nprint("OSError: [Errno 28] No space left on device", flush=True)\n'
            "sys.exit(1)\n",
            "the output disk is full (the script could not write: OSError: [Errno 28] No "
            "space left on device): free some space and POST the job again",
        ),
    ],
    ids=["exit-0-without-images", "its-own-full-disk"],
)
@pytest.mark.parametrize("runner", ["resident", "process"])
def test_how_a_script_ended_is_the_error(
    tmp_path: Path, script: str, error: str, runner: str
) -> None:
    async def scenario() -> None:
        repo = stand_in_repository(tmp_path, script)
        manager = JobManager(settings(tmp_path / "output", repository=repo, runner=runner))
        await manager.start(manager.recover())
        job = await manager.submit("text-to-image", text_params(), {}, {})
        await until(lambda: job.status.finished, "the job to fail")
        await manager.shutdown()
        assert (job.status, job.error) == (Status.FAILED, error)

    asyncio.run(scenario())


def test_recovery_puts_every_crash_window_right(tmp_path: Path) -> None:
    """What a kill -9 can leave, laid out by hand, then one start."""

    async def make() -> tuple[Job, Job, Job]:
        manager = JobManager(settings(tmp_path / "output"))  # not started: jobs stay queued
        jobs = [
            await manager.submit("text-to-image", text_params(prompt=p, iterations=2), {}, {})
            for p in ("all made", "one missing", "ours running")
        ]
        for job, made in zip(jobs, (2, 2, 1), strict=True):
            await manager.store.commit(job, lifecycle.start(job, None, time.time()))
            for n in range(1, made + 1):
                path = manager.store.layout.image(job.endpoint, job.id, n)
                path.write_bytes(b"png")
                record = ImageRecord(n, 42, n, "ab")
                await manager.store.commit(job, lifecycle.publish(job, record))
        manager.store.layout.image(jobs[1].endpoint, jobs[1].id, 2).unlink()
        return jobs[0], jobs[1], jobs[2]

    all_made, one_missing, ours = asyncio.run(make())
    layout = JobManager(settings(tmp_path / "output")).store.layout
    # A script a dead server left running for `ours`: its argv names the run folder.
    run_dir = layout.run_dir(ours.endpoint, ours.id)
    run_dir.mkdir()
    script = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(run_dir), "scripts/txt2img.py"],
        start_new_session=True,
    )
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for job, pid in ((ours, script.pid), (one_missing, stranger.pid)):
            path = layout.sidecar(job.endpoint, job.id)
            text = path.read_text().replace('"pid": null', f'"pid": {pid}')
            path.write_text(text)
        # A POST never answered (marker, no sidecar), and a finished job whose marker stayed.
        unanswered = layout.job_dir("text-to-image", "ab" * 16)
        (unanswered / "inputs").mkdir(parents=True)
        layout.marker("text-to-image", "ab" * 16).touch()

        manager = JobManager(settings(tmp_path / "output"))
        queued = manager.recover()
        assert [job.id for job in queued] == [one_missing.id, ours.id]  # submission order
        assert all(job.status is Status.QUEUED and len(job.images) == 1 for job in queued)
        assert script.wait(5) == -signal.SIGKILL  # ours, ended
        assert stranger.poll() is None  # not ours: untouched
        assert not unanswered.exists()
        finished = manager.store.cached(all_made.endpoint, all_made.id)
        assert finished is not None and finished.status is Status.COMPLETE
        markers = {p.name for p in layout.queue_dir.iterdir()}
        assert markers == {f"text-to-image.{job.id}" for job in queued}
        assert not run_dir.exists()
    finally:
        for process in (script, stranger):
            process.kill()
            process.wait()
